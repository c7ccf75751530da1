//! Upstream connections kept open between requests: HTTP/1.1 over verified TLS (`upstream`).
//!
//! Each agent connection keeps the upstream connection its last request used ([`ConnSlot`]),
//! so a keep-alive agent reuses it without touching anything shared: no lock held by other
//! connections, no hashing, no task per request (hyper-util's pool did all three, about a
//! tenth of the proxy thread's instructions). Connections left over, from an agent connection
//! that ended or a second request in flight on an h2 agent connection, go to a pool shared by
//! all agent connections, so short-lived agent processes still skip the TCP and TLS
//! handshakes. Idle connections are closed after [`IDLE_TIMEOUT`].
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

/// The shared pool, and how to make new connections.
pub struct UpstreamPool {
    connector: UpstreamConnector,
    /// Idle connections by upstream. Few upstreams (one per managed host in use): a list.
    idle: Mutex<Vec<Upstream>>,
    sweeper_started: AtomicBool,
}

/// The upstream connection an agent connection used last. On drop (the agent connection
/// ended) it goes to the shared pool.
pub struct ConnSlot {
    pool: Arc<UpstreamPool>,
    held: Mutex<Option<Upstream>>,
}

impl UpstreamPool {
    pub fn new(connector: UpstreamConnector) -> Arc<UpstreamPool> {
        Arc::new(UpstreamPool {
            connector,
            idle: Mutex::new(Vec::new()),
            sweeper_started: AtomicBool::new(false),
        })
    }

    /// The slot for a new agent connection.
    pub fn slot(self: &Arc<Self>) -> Arc<ConnSlot> {
        Arc::new(ConnSlot {
            pool: self.clone(),
            held: Mutex::new(None),
        })
    }

    /// Send `req` (origin-form URI; its Host header is set here) to `host:port` on an open
    /// connection if there is one, else on a new one. A request that never left because the
    /// reused connection had just closed is sent again on another; anything else that fails
    /// is the caller's to report. The response body hands the connection back when read to
    /// the end.
    pub async fn send(
        self: &Arc<Self>,
        slot: &Arc<ConnSlot>,
        host: &str,
        port: u16,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        loop {
            let (mut upstream, reused) = match self.take(slot, host, port) {
                Some(mut upstream) => {
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
                None => (self.connect(host, port).await?, false),
            };
            req.headers_mut()
                .insert(header::HOST, upstream.host_header.clone());
            match upstream.sender.try_send_request(req).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = LeasedBody {
                        inner: body,
                        lease: Some((upstream, slot.clone())),
                    };
                    return Ok(Response::from_parts(parts, body.boxed()));
                }
                Err(mut err) => match err.take_message() {
                    // Not sent: a reused connection closed under it. A new connection
                    // failing the same way is not retried.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Http(err.into_error())),
                },
            }
        }
    }

    /// An idle connection to `host:port`: the agent connection's own, else a shared one.
    fn take(self: &Arc<Self>, slot: &ConnSlot, host: &str, port: u16) -> Option<Upstream> {
        let now = Instant::now();
        let own = lock(&slot.held).take();
        if let Some(upstream) = own {
            if upstream.is_for(host, port) && !upstream.expired(now) {
                return Some(upstream);
            }
            self.put(upstream);
        }
        let mut idle = lock(&self.idle);
        // The most recently used first: the likeliest to be still open.
        while let Some(i) = idle.iter().rposition(|u| u.is_for(host, port)) {
            let upstream = idle.remove(i);
            if !upstream.expired(now) {
                return Some(upstream);
            }
        }
        None
    }

    /// Keep `upstream` in the shared pool (if it is open and there is room).
    fn put(self: &Arc<Self>, upstream: Upstream) {
        let now = Instant::now();
        if upstream.expired(now) {
            return;
        }
        let mut idle = lock(&self.idle);
        idle.retain(|u| !u.expired(now));
        let same = idle
            .iter()
            .filter(|u| u.is_for(&upstream.host, upstream.port))
            .count();
        if same < MAX_IDLE_PER_UPSTREAM {
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

impl ConnSlot {
    /// Hand back a connection whose response body ended: to this agent connection if it holds
    /// none, else to the shared pool.
    fn give_back(&self, mut upstream: Upstream) {
        upstream.idle_since = Instant::now();
        let mut held = lock(&self.held);
        if held.is_none() {
            *held = Some(upstream);
            return;
        }
        drop(held);
        self.pool.put(upstream);
    }
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSlot").finish_non_exhaustive()
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(upstream) = lock(&self.held).take() {
            self.pool.put(upstream);
        }
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of a list of connections: still a
/// list of connections.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An upstream response body that hands its connection back when it ends.
struct LeasedBody {
    inner: Incoming,
    lease: Option<(Upstream, Arc<ConnSlot>)>,
}

impl LeasedBody {
    fn give_back(&mut self) {
        if let Some((upstream, slot)) = self.lease.take() {
            slot.give_back(upstream);
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
