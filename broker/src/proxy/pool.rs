//! Upstream connections kept open between requests: HTTP/1.1 over verified TLS (`upstream`).
//!
//! One list of idle connections, shared by all agent connections: a request takes the most
//! recently used connection to its upstream, and its response body puts the connection back.
//! So short-lived agent processes skip the TCP and TLS handshakes, and many agent
//! connections that take turns share a few upstream connections. The list is short (one
//! entry per upstream connection not in use) and its lock is held for a few instructions; no
//! hashing and no task per request (hyper-util's pool, used before, did both and took about a
//! tenth of the proxy thread's instructions). Idle connections are closed after
//! [`IDLE_TIMEOUT`].
//!
//! A connection is handed back only once its response body has been read to the end; one whose
//! body was abandoned is closed by hyper and dropped here. An upgrade's connection
//! ([`UpstreamPool::connect_unpooled`]) is never pooled.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use super::upstream::{ConnectError, UpstreamConnector};
use super::{BoxError, ProxyBody};

/// How long an unused upstream connection stays open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most idle connections kept per upstream in the shared pool.
const MAX_IDLE_PER_UPSTREAM: usize = 64;
/// How long a request waits for an idle connection to become ready before it takes another.
const READY_WAIT: Duration = Duration::from_secs(1);
/// How often the shared pool closes connections idle for longer than [`IDLE_TIMEOUT`].
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Idle time after which a connection is checked for a close the runtime has not noticed yet.
/// Upstreams close idle connections on timers of their own, commonly 5 s and up.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// Why a request could not be forwarded.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (resolve, TCP, TLS, certificate).
    Connect(ConnectError),
    /// The connection failed while the request or its answer was under way.
    Http(hyper::Error),
}

/// One open upstream connection, and what it is a connection to.
struct Upstream {
    host: Box<str>,
    port: u16,
    /// `host` or `host:port`, the Host header of every request on this connection.
    host_header: HeaderValue,
    sender: SendRequest<ProxyBody>,
    idle_since: Instant,
}

impl Upstream {
    fn is_for(&self, host: &str, port: u16) -> bool {
        self.port == port && *self.host == *host
    }

    fn expired(&self, now: Instant) -> bool {
        self.sender.is_closed() || now.duration_since(self.idle_since) > IDLE_TIMEOUT
    }
}

/// The idle connections, and how to make new ones.
pub struct UpstreamPool {
    connector: UpstreamConnector,
    /// Idle connections of every upstream, the most recently used last. Few upstreams (one
    /// per managed host in use) and few idle connections each: a list.
    idle: Mutex<Vec<Upstream>>,
    sweeper_started: AtomicBool,
}

impl UpstreamPool {
    pub fn new(connector: UpstreamConnector) -> Arc<UpstreamPool> {
        Arc::new(UpstreamPool {
            connector,
            idle: Mutex::new(Vec::new()),
            sweeper_started: AtomicBool::new(false),
        })
    }

    /// Send `req` (origin-form URI; its Host header is set here) to `host:port` on an open
    /// connection if there is one, else on a new one. The response body hands the connection
    /// back when read to the end.
    ///
    /// An upstream may close an idle connection just as a request goes out on it. A request
    /// that never left is sent again on another connection; so is one that left but got no
    /// answer, if it has no body and its method is idempotent (RFC 9110, 9.2.2) or it carries
    /// an `Idempotency-Key`. Anything else that fails is the caller's to report.
    pub async fn send(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        loop {
            let (mut upstream, reused) = match self.take(host, port) {
                Some((mut upstream, idle)) => {
                    if idle >= STALE_AFTER {
                        // A close that arrived while the connection sat idle is seen only once
                        // the runtime polls its sockets: yield to it before trusting the
                        // connection with a request it may not be able to send again.
                        tokio::task::yield_now().await;
                    }
                    // Handed back when its last response body ended; hyper marks it ready a
                    // moment later, or once the agent finished an upload the upstream answered
                    // early. An error: it closed meanwhile.
                    if !upstream.sender.is_ready() {
                        let ready = tokio::time::timeout(READY_WAIT, upstream.sender.ready());
                        if !matches!(ready.await, Ok(Ok(()))) {
                            continue;
                        }
                    }
                    (upstream, true)
                }
                // Boxed: a new connection is rare, and its future (2.4 KB) inline would be
                // part of every request's.
                None => (Box::pin(self.connect(host, port)).await?, false),
            };
            req.headers_mut()
                .insert(header::HOST, upstream.host_header.clone());
            let replay = if reused { replayable_copy(&req) } else { None };
            match upstream.sender.try_send_request(req).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = LeasedBody {
                        inner: body,
                        lease: Some((upstream, self.clone())),
                    };
                    return Ok(Response::from_parts(parts, body.boxed()));
                }
                Err(mut err) => match (err.take_message(), replay) {
                    // Not sent: a reused connection closed under it. A new connection
                    // failing the same way is not retried.
                    (Some(unsent), _) if reused => req = unsent,
                    (None, Some(copy)) if closed_before_answer(err.error()) => req = copy,
                    _ => return Err(SendError::Http(err.into_error())),
                },
            }
        }
    }

    /// An idle connection to `host:port` and how long it has been idle.
    fn take(&self, host: &str, port: u16) -> Option<(Upstream, Duration)> {
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        // The most recently used first: the likeliest to be still open.
        while let Some(i) = idle.iter().rposition(|u| u.is_for(host, port)) {
            let upstream = idle.remove(i);
            if !upstream.expired(now) {
                let idle = now.duration_since(upstream.idle_since);
                return Some((upstream, idle));
            }
        }
        None
    }

    /// Keep `upstream`, whose last response has ended, for the next request (if it is open
    /// and there is room).
    fn put(self: &Arc<Self>, mut upstream: Upstream) {
        let now = Instant::now();
        if upstream.sender.is_closed() {
            return;
        }
        upstream.idle_since = now;
        let mut idle = lock(&self.idle);
        let same = |idle: &Vec<Upstream>| {
            idle.iter()
                .filter(|u| u.is_for(&upstream.host, upstream.port))
                .count()
        };
        // Closed and stale connections go when `take` meets them or the sweeper runs; here
        // only when they would keep a live one out.
        if same(&idle) >= MAX_IDLE_PER_UPSTREAM {
            idle.retain(|u| !u.expired(now));
        }
        if same(&idle) < MAX_IDLE_PER_UPSTREAM {
            idle.push(upstream);
        }
        drop(idle);
        self.start_sweeper();
    }

    /// Close expired connections every [`SWEEP_EVERY`] while this pool exists (a pool no request
    /// touches any more would otherwise keep its connections until the upstreams close them).
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.load(Ordering::Relaxed) {
            return;
        }
        // Outside a runtime (a drop at shutdown), nothing to schedule and nothing to keep.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<UpstreamPool> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(pool) = pool.upgrade() else { return };
                let now = Instant::now();
                lock(&pool.idle).retain(|u| !u.expired(now));
            }
        });
    }

    /// A new connection to `host:port` that is never pooled (an upgrade's), and its Host
    /// header.
    pub async fn connect_unpooled(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(SendRequest<ProxyBody>, HeaderValue), SendError> {
        let upstream = self.connect(host, port).await?;
        Ok((upstream.sender, upstream.host_header))
    }

    async fn connect(&self, host: &str, port: u16) -> Result<Upstream, SendError> {
        let io = self
            .connector
            .connect(host, port)
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            // With upgrades: a WebSocket's connection (`connect_unpooled`) is taken over after
            // its 101; for the others this changes nothing.
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(%err, "upstream connection ended with an error");
            }
        });
        let host_header = if port == 443 {
            HeaderValue::from_str(host)
        } else {
            HeaderValue::from_str(&format!("{host}:{port}"))
        }
        .map_err(|_| SendError::Connect(ConnectError::BadUri))?;
        Ok(Upstream {
            host: host.into(),
            port,
            host_header,
            sender,
            idle_since: Instant::now(),
        })
    }
}

/// A copy of `req` to send again should its connection close before an answer: only for a
/// request without a body (a body is streamed, not kept) that may be repeated safely.
fn replayable_copy(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let repeatable = req.method().is_idempotent() || req.headers().contains_key("idempotency-key");
    if !repeatable || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Did the connection end before any answer to the request: closed, or reset by the upstream?
fn closed_before_answer(err: &hyper::Error) -> bool {
    if err.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

/// A poisoned lock only means a panic elsewhere mid-update of a list of connections: still a
/// list of connections.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An upstream response body that hands its connection back when it ends.
struct LeasedBody {
    inner: Incoming,
    lease: Option<(Upstream, Arc<UpstreamPool>)>,
}

impl LeasedBody {
    fn give_back(&mut self) {
        if let Some((upstream, pool)) = self.lease.take() {
            pool.put(upstream);
        }
    }
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                // The connection is broken: never handed back.
                self.lease = None;
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        // Read to its last byte without being polled to the end (a known length), or empty
        // from the start (nobody polls it): reusable. Otherwise hyper closes the connection,
        // as the rest of the body is still on it.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::mpsc;

    use http_body_util::{BodyExt as _, Empty, Full};

    use super::*;
    use crate::ca::LocalCa;
    use crate::proxy::upstream::{ResolveOverride, UpstreamSettings};

    const HOST: &str = "api.example.com";

    /// A TLS origin on its own thread. Each connection answers one request with 200 and then
    /// waits for a word on `close` before it closes, without having said it would.
    struct ClosingOrigin {
        addr: SocketAddr,
        ca_file: tempfile::NamedTempFile,
        close: mpsc::Sender<()>,
        accepted: mpsc::Receiver<()>,
    }

    fn closing_origin() -> ClosingOrigin {
        let ca = Arc::new(LocalCa::new(&[HOST.to_string()], "pool test").expect("ca"));
        let mut ca_file = tempfile::NamedTempFile::new().expect("temp file");
        ca_file
            .write_all(ca.cert_pem().as_bytes())
            .expect("write ca");
        let config = crate::proxy::listen::server_config(ca).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (close, close_rx) = mpsc::channel::<()>();
        let (accepted_tx, accepted) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut tcp) = stream else { return };
                let _ = accepted_tx.send(());
                let mut tls = rustls::ServerConnection::new(config.clone()).expect("tls");
                let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream
                    .write_all(answer)
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return;
                }
                if close_rx.recv().is_err() {
                    return;
                }
                tls.send_close_notify();
                let _ = tls.complete_io(&mut tcp);
                // Dropping the socket closes it.
            }
        });
        ClosingOrigin {
            addr,
            ca_file,
            close,
            accepted,
        }
    }

    fn get() -> Request<ProxyBody> {
        let body = Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed();
        Request::get("/v1/models").body(body).expect("request")
    }

    fn post() -> Request<ProxyBody> {
        let body = Full::new(Bytes::from_static(b"{}"))
            .map_err(|never| match never {})
            .boxed();
        Request::post("/v1/chat/completions")
            .body(body)
            .expect("request")
    }

    /// Send `first` to a [`closing_origin`], read its answer, have the origin close the
    /// connection, keep the runtime from noticing for `unnoticed`, then send `second`. Returns
    /// the second answer's body (or the error) and how many connections the origin accepted.
    fn close_between(
        first: Request<ProxyBody>,
        unnoticed: Duration,
        second: Request<ProxyBody>,
    ) -> (Result<Bytes, String>, usize) {
        let origin = closing_origin();
        let pool = UpstreamPool::new(UpstreamConnector::new(
            UpstreamSettings {
                extra_ca: Some(origin.ca_file.path().to_path_buf()),
                resolve: vec![ResolveOverride {
                    host: HOST.into(),
                    port: 443,
                    addr: origin.addr,
                }],
                dns: Vec::new(),
                proxy: None,
            },
            Vec::new(),
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let answer = runtime.block_on(async {
            let answer = pool.send(HOST, 443, first).await.expect("first");
            assert_eq!(answer.status(), 200);
            answer.into_body().collect().await.expect("first body");
            assert_eq!(lock(&pool.idle).len(), 1, "the connection was not put back");

            // The runtime is blocked while the origin closes, so the connection's task cannot
            // see the close before the next request is queued on it.
            origin.close.send(()).expect("close");
            std::thread::sleep(unnoticed);

            match pool.send(HOST, 443, second).await {
                Ok(answer) => {
                    assert_eq!(answer.status(), 200);
                    let body = answer.into_body().collect().await.expect("second body");
                    Ok(body.to_bytes())
                }
                Err(err) => Err(format!("{err:?}")),
            }
        });
        (answer, origin.accepted.try_iter().count())
    }

    #[test]
    fn a_get_sent_on_a_connection_that_had_just_closed_is_sent_again() {
        let (answer, accepted) = close_between(get(), Duration::from_millis(200), get());
        assert_eq!(answer.expect("second answer"), "ok");
        assert_eq!(accepted, 2, "the second request needs one new connection");
    }

    #[test]
    fn a_connection_idle_for_a_while_is_checked_before_a_post_goes_out_on_it() {
        let unnoticed = STALE_AFTER + Duration::from_millis(200);
        let (answer, accepted) = close_between(post(), unnoticed, post());
        assert_eq!(answer.expect("second answer"), "ok");
        assert_eq!(accepted, 2);
    }

    #[test]
    fn a_post_that_left_on_a_closing_connection_is_not_sent_twice() {
        let (answer, accepted) = close_between(post(), Duration::from_millis(200), post());
        // The closed connection answers with EOF, or with a reset once the request reached it.
        let err = answer.expect_err("a POST is not repeated");
        assert!(err.starts_with("Http("), "{err}");
        assert_eq!(accepted, 1, "the POST went out once");
    }
}
