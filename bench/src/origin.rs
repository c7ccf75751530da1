//! The origin the benchmark talks to, standing in for `api.openai.com`: TLS with its own CA,
//! h1 and h2, a small JSON answer for the real key (401 for anything else, so a 200 proves the
//! swap happened) and an SSE endpoint. Runs as its own process (`bench origin`) so it can be
//! started inside a network namespace and so its CPU and memory are not the client's.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

pub const HOST: &str = "api.openai.com";
pub const JSON_PATH: &str = "/v1/models";
/// A made-up key in OpenAI's format; it never leaves this machine.
pub const REAL_KEY: &str = "sk-bench-0123456789abcdefghijklmnopqrstuv";
const JSON_BODY: &str =
    r#"{"object":"list","data":[{"id":"gpt-bench","object":"model","owned_by":"bench"}]}"#;

/// `bench origin --dir DIR --listen ADDR`: write `DIR/ca.pem`, print `listening ADDR`, serve
/// until stdin closes (the parent exited or dropped us).
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut dir = None;
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = it.next().map(PathBuf::from),
            "--listen" => listen = it.next().context("--listen ADDR")?.parse()?,
            other => anyhow::bail!("origin: unknown argument {other}"),
        }
    }
    let dir = dir.context("origin: --dir DIR")?;
    let config = tls_config(&dir)?;
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
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service_fn(serve))
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

type Body = BoxBody<Bytes, Infallible>;

async fn serve(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {REAL_KEY}").as_bytes());
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    // Drain the request body (there is none in this benchmark, but be a good server).
    let _ = req.into_body().collect().await;
    let response = if !authorized {
        Response::builder()
            .status(401)
            .body(Full::new(Bytes::from_static(b"bad key\n")).boxed())
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
