//! The origin the benchmark talks to, standing in for `api.openai.com`: TLS with its own CA,
//! h1 and h2, a small JSON answer for the real key (401 for anything else, so a 200 proves the
//! swap happened) and an SSE endpoint. Runs as its own process (`bench origin`) so it can be
//! started inside a network namespace and so its CPU and memory are not the client's.
//!
//! For the soak program it also plays a broken upstream, chosen by the request's path (see
//! [`Fault`] and the `SOAK_*` paths): a WebSocket echo, an answer that quotes the key, a reset
//! in the middle of a body, headers and then nothing, bytes that are not HTTP, and a body cut
//! short of its `Content-Length`. The broker talks HTTP/1.1 to upstreams, so the faults are
//! written for HTTP/1.1: the connection's I/O is wrapped ([`FaultIo`]) so a handler can make
//! the next write go wrong in the way it picked.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const HOST: &str = "api.openai.com";
pub const JSON_PATH: &str = "/v1/models";
/// A made-up key in OpenAI's format; it never leaves this machine.
pub const REAL_KEY: &str = "sk-bench-0123456789abcdefghijklmnopqrstuv";
/// The soak's paths: each answers as the fault it names (with the real key only; 401 otherwise).
pub const SOAK_ECHO: &str = "/v1/soak/echo";
pub const SOAK_WS: &str = "/v1/soak/ws";
pub const SOAK_RESET: &str = "/v1/soak/reset";
pub const SOAK_STALL: &str = "/v1/soak/stall";
pub const SOAK_GARBAGE: &str = "/v1/soak/garbage";
pub const SOAK_SHORT: &str = "/v1/soak/short";
/// What the origin writes instead of a status line on [`SOAK_GARBAGE`]: no HTTP in it.
const GARBAGE: &[u8] = b"\x00\xff\xfe garbage, not HTTP \x1b[31m\r\n\r\n\x00\x01\x02";
/// Bytes of body sent before the reset or the early close.
const PARTIAL_BODY: usize = 1000;
/// The `Content-Length` the reset and short answers announce (more than they send).
const ANNOUNCED_BODY: usize = 4096;
const JSON_BODY: &str =
    r#"{"object":"list","data":[{"id":"gpt-bench","object":"model","owned_by":"bench"}]}"#;

/// Requests the origin refused because they did not carry the real key: the soak reads the
/// count from `DIR/refused` (written as it changes), since each one is a swap that did not
/// happen.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// `bench origin --dir DIR --listen ADDR [--stall-secs S]`: write `DIR/ca.pem`, print
/// `listening ADDR`, serve until stdin closes (the parent exited or dropped us).
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut dir = None;
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut stall = Duration::from_secs(60);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = it.next().map(PathBuf::from),
            "--listen" => listen = it.next().context("--listen ADDR")?.parse()?,
            "--stall-secs" => {
                stall = Duration::from_secs(it.next().context("--stall-secs S")?.parse()?)
            }
            other => anyhow::bail!("origin: unknown argument {other}"),
        }
    }
    let dir = dir.context("origin: --dir DIR")?;
    let config = tls_config(&dir)?;
    let refused_file = dir.join("refused");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        // Exit when the parent goes away.
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            std::process::exit(0);
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let refused_file = refused_file.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let fault = Arc::new(AtomicU8::new(Fault::None as u8));
                let io = FaultIo {
                    inner: tls,
                    fault: fault.clone(),
                };
                let service = service_fn(move |req| {
                    let (fault, refused_file) = (fault.clone(), refused_file.clone());
                    async move {
                        let before = REFUSED.load(Ordering::Relaxed);
                        let response = serve(req, fault, stall).await;
                        let after = REFUSED.load(Ordering::Relaxed);
                        if after != before {
                            let _ = std::fs::write(&refused_file, after.to_string());
                        }
                        response
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .await;
            });
        }
    })
}

/// A fresh CA (written to `dir/ca.pem`) and a leaf for [`HOST`] signed by it.
fn tls_config(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "broker bench origin CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![HOST.to_string()])?.signed_by(&key, &ca, &ca_key)?;
    // The same leaf and key for the bench's nginx reverse proxy (bench/src/nginx.rs), so its
    // listener is trusted by the origin's CA, as the origin is. A throwaway key for a test
    // hostname, readable by this user only.
    std::fs::write(dir.join("leaf.pem"), leaf.pem())?;
    write_private(&dir.join("leaf.key"), key.serialize_pem().as_bytes())?;
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(data)
}

type Body = BoxBody<Bytes, Infallible>;

async fn serve(
    mut req: Request<Incoming>,
    fault: Arc<AtomicU8>,
    stall: Duration,
) -> Result<Response<Body>, Infallible> {
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {REAL_KEY}").as_bytes());
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    if authorized && path == SOAK_WS {
        return Ok(websocket(&mut req));
    }
    // Drain the request body (there is none in this benchmark, but be a good server).
    let _ = req.into_body().collect().await;
    let response = if !authorized {
        REFUSED.fetch_add(1, Ordering::Relaxed);
        Response::builder()
            .status(401)
            .body(Full::new(Bytes::from_static(b"bad key\n")).boxed())
    } else if path.starts_with("/v1/soak/") {
        return Ok(soak_answer(&path, fault, stall));
    } else if path == "/v1/sse" {
        let param = |name: &str, default: u64| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(default)
        };
        let (count, gap) = (param("n", 20), Duration::from_millis(param("gap_ms", 20)));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..count {
                // On a fixed schedule, so a late wake-up does not shift every later event.
                tokio::time::sleep_until(start + gap * i as u32).await;
                let frame = Frame::data(Bytes::from(format!("data: {{\"event\":{i}}}\n\n")));
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(PollFn(move |cx: &mut std::task::Context<'_>| rx.poll_recv(cx)).boxed())
    } else {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(JSON_BODY.as_bytes())).boxed())
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}

/// A response body from a poll function (a channel of frames).
struct PollFn<F>(F);

impl<F> hyper::body::Body for PollFn<F>
where
    F: FnMut(
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>>
        + Unpin,
{
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        (self.0)(cx)
    }
}

/// What the next write on a connection does: pass through, or go wrong one way.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fault {
    None = 0,
    /// Write [`GARBAGE`] instead of what hyper writes, then fail (the connection is dropped:
    /// FIN without TLS close_notify).
    Garbage,
    /// [`GARBAGE`] is out; flush it, then fail.
    GarbageSent,
    /// Set `SO_LINGER` 0 and fail: the drop that follows sends a TCP RST.
    Reset,
    /// Close cleanly (TLS close_notify, then FIN) and fail: the body ends short.
    Close,
}

impl Fault {
    fn of(v: u8) -> Fault {
        match v {
            1 => Fault::Garbage,
            2 => Fault::GarbageSent,
            3 => Fault::Reset,
            4 => Fault::Close,
            _ => Fault::None,
        }
    }
}

/// The origin's TLS stream, with a switch a handler flips to break the connection on its next
/// write (see [`Fault`]).
struct FaultIo {
    inner: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    fault: Arc<AtomicU8>,
}

fn failed(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, what.to_string())
}

impl AsyncRead for FaultIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl FaultIo {
    /// Carry out the pending fault; `Ready(Err)` once it is done, so hyper drops the connection.
    fn poll_fault(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Fault::of(self.fault.load(Ordering::Relaxed)) {
            Fault::None => Poll::Ready(Ok(())),
            Fault::Garbage => {
                ready!(Pin::new(&mut self.inner).poll_write(cx, GARBAGE))?;
                self.fault
                    .store(Fault::GarbageSent as u8, Ordering::Relaxed);
                self.poll_fault(cx)
            }
            Fault::GarbageSent => {
                ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
                Poll::Ready(Err(failed("garbage sent")))
            }
            Fault::Reset => {
                let tcp = self.inner.get_ref().0;
                rustix::net::sockopt::set_socket_linger(tcp, Some(Duration::ZERO))?;
                Poll::Ready(Err(failed("reset")))
            }
            Fault::Close => {
                ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
                Poll::Ready(Err(failed("closed early")))
            }
        }
    }
}

impl AsyncWrite for FaultIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_fault(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_fault(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_fault(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The key as an upstream might quote it: raw, in base64 and in an `Authorization: Basic`
/// style header. The broker must overwrite each before the agent sees it.
pub fn echo_body() -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(REAL_KEY);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{REAL_KEY}"));
    format!(
        "{{\"error\":\"invalid key {REAL_KEY}\",\"debug\":\"{b64}\",\"basic\":\"Basic {basic}\"}}\n"
    )
}

/// A body of `first` then, `after` later, `fault` flipped and one more frame so hyper writes
/// (and so meets the fault); the stream stays open until `hold` has passed.
fn broken_body(
    fault_cell: Arc<AtomicU8>,
    first: Option<Bytes>,
    after: Duration,
    fault: Fault,
    hold: Duration,
) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    tokio::spawn(async move {
        if let Some(first) = first {
            if tx.send(Ok(Frame::data(first))).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(after).await;
        if fault != Fault::None {
            fault_cell.store(fault as u8, Ordering::Relaxed);
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
        }
        // Holding the sender keeps the body open (hyper waits for it) until `hold` is up or
        // the connection is gone.
        tokio::select! {
            _ = tokio::time::sleep(hold) => {}
            _ = tx.closed() => {}
        }
    });
    PollFn(move |cx: &mut Context<'_>| rx.poll_recv(cx)).boxed()
}

/// The answer for a `/v1/soak/...` path (the request carried the real key).
fn soak_answer(path: &str, fault: Arc<AtomicU8>, stall: Duration) -> Response<Body> {
    let builder = Response::builder().header("content-type", "application/json");
    let partial = || Some(Bytes::from(vec![b'x'; PARTIAL_BODY]));
    // A gap between the part of the body that goes out and the fault, so the part really
    // leaves (a reset discards what is still in the socket's send buffer).
    let gap = Duration::from_millis(50);
    let response = match path {
        SOAK_ECHO => builder
            // A header that quotes the key too: the broker redacts headers as well as bodies.
            .header("x-debug-key", REAL_KEY)
            .body(Full::new(Bytes::from(echo_body())).boxed()),
        SOAK_GARBAGE => {
            // hyper writes the status line next: it becomes the garbage.
            fault.store(Fault::Garbage as u8, Ordering::Relaxed);
            builder.body(Full::new(Bytes::from_static(b"{}")).boxed())
        }
        SOAK_RESET => builder
            .header("content-length", ANNOUNCED_BODY)
            .body(broken_body(fault, partial(), gap, Fault::Reset, stall)),
        SOAK_SHORT => builder
            .header("content-length", ANNOUNCED_BODY)
            .body(broken_body(fault, partial(), gap, Fault::Close, stall)),
        // Headers, then nothing for `stall` (longer than any of the broker's timeouts), then
        // the end of an empty chunked body.
        SOAK_STALL => builder.body(broken_body(fault, None, stall, Fault::None, Duration::ZERO)),
        _ => builder
            .status(404)
            .body(Full::new(Bytes::from_static(b"no such soak path\n")).boxed()),
    };
    response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// Accept a WebSocket and echo its messages; to `whoami` it answers with the `Authorization`
/// it got (the real key), which the broker must overwrite in the frame.
fn websocket(req: &mut Request<Incoming>) -> Response<Body> {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut sink, mut stream) = ws.split();
        while let Some(Ok(msg)) = stream.next().await {
            let reply = match msg {
                Message::Text(t) if t.as_str() == "whoami" => {
                    Message::text(format!("you are Bearer {REAL_KEY}"))
                }
                Message::Text(_) | Message::Binary(_) => msg,
                Message::Close(_) => break,
                _ => continue,
            };
            if sink.send(reply).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
