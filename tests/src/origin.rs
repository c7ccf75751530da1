//! In-process TLS origins standing in for providers' APIs: h1 and h2, every request
//! recorded, replies chosen by the test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::TestCa;

/// One request as the origin received it.
#[derive(Debug, Clone)]
pub struct OriginRequest {
    pub method: String,
    /// Path and query, exactly as received.
    pub target: String,
    /// The host the request named: h2's `:authority`, else h1's `Host` header.
    pub authority: String,
    pub version: http::Version,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl OriginRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the origin answers.
pub enum Reply {
    /// A status and a body.
    Text(u16, String),
    /// A status and a body already in `Content-Encoding: <coding>`.
    Encoded {
        status: u16,
        coding: &'static str,
        body: Vec<u8>,
    },
    /// `count` server-sent events in lock step with the client: event `i` is sent only once
    /// `delivered` (counted by the client, see [`crate::send_counting`]) reaches `i`. A proxy
    /// that held events back would stall this; after 10 s the origin sends anyway and sets
    /// `stalled`. Deterministic however loaded the machine is.
    Sse {
        count: usize,
        delivered: Arc<AtomicUsize>,
        stalled: Arc<AtomicBool>,
    },
    /// Accept a WebSocket upgrade and echo every message; to the text message `whoami` it
    /// answers with the `Authorization` it was opened with (an upstream quoting the key), and
    /// to `whoami in pieces` with the same text as a fragmented message cut inside the key.
    WebSocketEcho,
    /// Accept any other upgrade (`Upgrade: <protocol>`) and echo the raw bytes; to the line
    /// `whoami` it answers `you are <Authorization>` in two writes cut inside the key.
    RawEcho,
    /// A status and a JSON body.
    Json(u16, String),
    /// 200 `text/event-stream`, each string sent as its own body chunk (a streamed model
    /// answer).
    Events(Vec<String>),
    /// Accept a WebSocket upgrade; to every text message, answer with each of these strings
    /// as a text message of its own (a model answer streamed over a WebSocket).
    WebSocketEvents(Vec<String>),
    /// Drop the connection without answering.
    Reset,
    /// A status with this HTTP/1.1 reason phrase (instead of the canonical one), extra
    /// headers and a body: an upstream that quotes what it received in any of them.
    Echo {
        status: u16,
        reason: Option<String>,
        headers: Vec<(String, String)>,
        body: String,
    },
}

type Handler = Arc<dyn Fn(&OriginRequest) -> Reply + Send + Sync>;

/// A local TLS origin on 127.0.0.1 (port 0), serving until dropped.
pub struct Origin {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<OriginRequest>>>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Origin {
    /// An origin with a certificate for `names` from `ca`.
    pub fn start(
        ca: &TestCa,
        names: &[&str],
        handler: impl Fn(&OriginRequest) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        let (chain, key) = ca.leaf(names);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("cert");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Origin::start_with(Arc::new(config), Arc::new(handler))
    }

    fn start_with(config: Arc<rustls::ServerConfig>, handler: Handler) -> Origin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accepted = connections.clone();
        runtime.spawn(async move {
            let acceptor = TlsAcceptor::from(config);
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                let recorded = recorded.clone();
                let mut accepted = accepted.lock().expect("lock");
                accepted.push(
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service =
                            service_fn(move |req| serve(req, handler.clone(), recorded.clone()));
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(tls), service)
                            .await;
                    })
                    .abort_handle(),
                );
            }
        });
        Origin {
            addr,
            requests,
            connections,
            _runtime: runtime,
        }
    }

    /// How many TCP connections the origin has accepted.
    pub fn connections_accepted(&self) -> usize {
        self.connections.lock().expect("lock").len()
    }

    /// Close every open connection, as a server does with idle keep-alive connections.
    pub fn close_connections(&self) {
        for connection in self.connections.lock().expect("lock").iter() {
            connection.abort();
        }
    }

    /// An origin for `host` that answers 200 with `body` to `Authorization: Bearer <key>`, as
    /// a provider's API does for a valid key, and 401 "no valid key" to anything else.
    pub fn bearer(ca: &TestCa, host: &str, key: &str, body: &str) -> Origin {
        let (expected, body) = (format!("Bearer {key}"), body.to_string());
        Origin::start(ca, &[host], move |req| {
            if req.header("authorization") == Some(expected.as_str()) {
                Reply::Text(200, body.clone())
            } else {
                Reply::Text(401, "no valid key".into())
            }
        })
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.requests.lock().expect("lock").clone()
    }
}

type OriginBody = BoxBody<Bytes, Infallible>;

async fn serve(
    mut req: Request<Incoming>,
    handler: Handler,
    recorded: Arc<Mutex<Vec<OriginRequest>>>,
) -> Result<Response<OriginBody>, std::io::Error> {
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let request = OriginRequest {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authority: parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            })
            .unwrap_or_default(),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    let reply = handler(&request);
    recorded.lock().expect("lock").push(request.clone());
    match reply {
        Reply::Text(status, text) => Ok(Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(text)).boxed())
            .expect("response")),
        Reply::Encoded {
            status,
            coding,
            body,
        } => Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .header("etag", "\"v1\"")
            .body(Full::new(Bytes::from(body)).boxed())
            .expect("response")),
        Reply::Json(status, text) => Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)).boxed())
            .expect("response")),
        Reply::Events(events) => {
            let stream = futures_util::stream::iter(
                events
                    .into_iter()
                    .map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(e)))),
            );
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response"))
        }
        Reply::WebSocketEvents(events) => {
            let key = request
                .header("sec-websocket-key")
                .unwrap_or_default()
                .to_string();
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            tokio::spawn(async move {
                use tokio_tungstenite::tungstenite::Message;
                let Ok(upgraded) = upgrade.await else { return };
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut sink, mut stream) = ws.split();
                while let Some(Ok(msg)) = stream.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if !msg.is_text() {
                        continue;
                    }
                    for event in &events {
                        if sink.send(Message::text(event.clone())).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(Full::new(Bytes::new()).boxed())
                .expect("response"))
        }
        Reply::Sse {
            count,
            delivered,
            stalled,
        } => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                for i in 0..count {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while delivered.load(Ordering::SeqCst) < i {
                        if tokio::time::Instant::now() > deadline {
                            stalled.store(true, Ordering::SeqCst);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let frame = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
            });
            let stream = tokio_stream_from(rx);
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response"))
        }
        Reply::WebSocketEcho => {
            let key = request
                .header("sec-websocket-key")
                .unwrap_or_default()
                .to_string();
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let auth = request
                .header("authorization")
                .unwrap_or_default()
                .to_string();
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
                    if msg.is_text() && msg.to_text().is_ok_and(|t| t == "whoami in pieces") {
                        // The same answer as a fragmented message, cut inside the key.
                        if send_in_pieces(&mut sink, &format!("you are {auth}"))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    let msg = match &msg {
                        tokio_tungstenite::tungstenite::Message::Text(t)
                            if t.as_str() == "whoami" =>
                        {
                            tokio_tungstenite::tungstenite::Message::text(format!("you are {auth}"))
                        }
                        _ => msg,
                    };
                    if msg.is_text() || msg.is_binary() {
                        if sink.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(Full::new(Bytes::new()).boxed())
                .expect("response"))
        }
        Reply::RawEcho => {
            let protocol = request.header("upgrade").unwrap_or_default().to_string();
            let answer = format!(
                "you are {}\n",
                request.header("authorization").unwrap_or_default()
            );
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let sent = if &buf[..n] == b"whoami\n" {
                        let (a, b) = answer.split_at(answer.len() - 10);
                        let first = io.write_all(a.as_bytes()).await;
                        let _ = io.flush().await;
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        first.and(io.write_all(b.as_bytes()).await)
                    } else {
                        io.write_all(&buf[..n]).await
                    };
                    if sent.and(io.flush().await).is_err() {
                        break;
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", protocol)
                .body(Full::new(Bytes::new()).boxed())
                .expect("response"))
        }
        Reply::Reset => Err(std::io::Error::other("origin resets this request")),
        Reply::Echo {
            status,
            reason,
            headers,
            body,
        } => {
            let mut response = Response::builder().status(status);
            for (name, value) in headers {
                response = response.header(name, value);
            }
            let mut response = response
                .body(Full::new(Bytes::from(body)).boxed())
                .expect("response");
            if let Some(reason) = reason {
                let reason = hyper::ext::ReasonPhrase::try_from(reason).expect("reason phrase");
                response.extensions_mut().insert(reason);
            }
            Ok(response)
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Send `text` as a two-frame message, cut 10 bytes before its end.
async fn send_in_pieces<S>(sink: &mut S, text: &str) -> Result<(), S::Error>
where
    S: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
{
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;
    let cut = text.len().saturating_sub(10);
    let (head, tail) = text.as_bytes().split_at(cut);
    let first = Frame::message(head.to_vec(), OpCode::Data(Data::Text), false);
    let last = Frame::message(tail.to_vec(), OpCode::Data(Data::Continue), true);
    sink.send(Message::Frame(first)).await?;
    sink.send(Message::Frame(last)).await
}
