//! The in-repo load generator: hyper client connections over rustls on one thread (like
//! `wrk -t1`), connecting the way a shimmed agent does (TCP to an address, SNI = the real
//! hostname, trusting one CA). Every response is checked for 200.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::origin::{HOST, JSON_PATH};

/// Where a leg sends its requests: the origin itself (direct) or the broker's fake address.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The CA the client trusts: the origin's (direct) or the run CA (broker).
    pub ca_pem: Vec<u8>,
    /// The `Authorization` value: the real key (direct) or the placeholder (broker).
    pub auth: String,
    /// What the shim writes first on a connection to the broker (magic + the run's ticket),
    /// sent right after the TCP connect as the shim does; `None` for the direct legs. Part of
    /// every brokered connection's cost, so the new-connection section measures it.
    pub preamble: Option<[u8; broker_contract::TICKET_PREAMBLE_LEN]>,
}

pub enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

fn tls(target: &Target, h2: bool, resume: bool) -> Arc<rustls::ClientConfig> {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let config = broker_integration::client_tls(&target.ca_pem, alpn);
    if resume {
        return config;
    }
    let mut config = (*config).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// TCP to the target and, for the broker, the run's ticket first, as the shim sends it.
pub async fn connect_tcp(target: &Target) -> anyhow::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connect {}", target.addr))?;
    tcp.set_nodelay(true)?;
    if let Some(preamble) = &target.preamble {
        // As the shim sends it: MSG_MORE, so it leaves in one segment with the ClientHello.
        // 40 bytes always fit a new socket's send buffer.
        let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
        let sent = rustix::net::send(&tcp, preamble, flags).context("ticket")?;
        anyhow::ensure!(sent == preamble.len(), "ticket: short write");
    }
    Ok(tcp)
}

/// A TLS connection to the target for [`HOST`], offering h2 or HTTP/1.1 only.
pub async fn connect_tls(
    target: &Target,
    h2: bool,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = connect_tcp(target).await?;
    let name = rustls_pki_types::ServerName::try_from(HOST)?;
    tokio_rustls::TlsConnector::from(tls(target, h2, true))
        .connect(name, tcp)
        .await
        .context("tls")
}

/// A connection ready for requests (h2 or HTTP/1.1), with session resumption.
pub async fn connect_sender(target: &Target, h2: bool) -> anyhow::Result<Sender> {
    connect(target, tls(target, h2, true), h2).await
}

async fn connect(
    target: &Target,
    config: Arc<rustls::ClientConfig>,
    h2: bool,
) -> anyhow::Result<Sender> {
    let tcp = connect_tcp(target).await?;
    let name = rustls_pki_types::ServerName::try_from(HOST)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .context("tls")?;
    let io = TokioIo::new(stream);
    Ok(if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(sender)
    })
}

impl Sender {
    /// One request for `path`; returns the status after the whole body was read.
    async fn get(&mut self, path: &str, auth: &str) -> anyhow::Result<u16> {
        let response = self.send(path, auth).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }

    /// One request for `path`: the status, and every byte received (the head's header lines
    /// and the body), for a caller that checks what came back.
    pub async fn fetch(&mut self, path: &str, auth: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let response = self.send(path, auth).await?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        for (name, value) in response.headers() {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                bytes.extend_from_slice(data);
            }
        }
        Ok((status, bytes))
    }

    /// Another handle on an h2 connection, for a concurrent stream (`None` for HTTP/1.1,
    /// which takes one request at a time).
    pub fn try_clone(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }

    /// Whether a request can go out on this connection now (an HTTP/1.1 one that carried a
    /// broken answer is closed).
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn send(
        &mut self,
        path: &str,
        auth: &str,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let builder = http::Request::builder()
            .method("GET")
            .header("authorization", auth)
            .header("accept", "*/*");
        Ok(match self {
            Sender::H1(s) => {
                s.ready().await?;
                let req = builder.uri(path).header("host", HOST).body(Empty::new())?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                let req = builder
                    .uri(format!("https://{HOST}{path}"))
                    .body(Empty::new())?;
                s.send_request(req).await?
            }
        })
    }
}

/// What one timed run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadResult {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub count: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn summarize(mut latencies: Vec<Duration>, window: Duration) -> LoadResult {
    latencies.sort();
    LoadResult {
        per_sec: latencies.len() as f64 / window.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        count: latencies.len(),
    }
}

/// Keep-alive requests on `conns` connections for `warmup + window`; only requests started in
/// the window count. `probe` runs as the window opens and as it closes, and its two readings
/// come back with the result (for what the processes spent in the window, not the warm-up).
pub async fn keep_alive<T>(
    target: &Target,
    h2: bool,
    conns: usize,
    warmup: Duration,
    window: Duration,
    mut probe: impl FnMut() -> T,
) -> anyhow::Result<(LoadResult, [T; 2])> {
    let config = tls(target, h2, true);
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(connect(target, config.clone(), h2).await?);
    }
    let start = Instant::now() + warmup;
    let end = start + window;
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let auth = target.auth.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(16_384);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let status = sender.get(JSON_PATH, &auth).await?;
                if status != 200 {
                    bail!("status {status}");
                }
                if t >= start {
                    latencies.push(t.elapsed());
                }
            }
            anyhow::Ok(latencies)
        });
    }
    // On this thread, between the requests: late by at most the timer's millisecond and one
    // poll of the tasks, small against a window of seconds.
    tokio::time::sleep_until(start.into()).await;
    let opened = probe();
    tokio::time::sleep_until(end.into()).await;
    let closed = probe();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok((summarize(all, window), [opened, closed]))
}

/// How long past its window a new-connection task may go to get its one sample.
const LATE_SAMPLE_GRACE: Duration = Duration::from_secs(30);

/// New TLS connections (full handshakes: no session resumption), one request each, `conc` at a
/// time; per_sec counts connections completed in the window, latencies are connect-to-200.
pub async fn new_connections(
    target: &Target,
    conc: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<LoadResult> {
    let config = tls(target, false, false);
    let start = Instant::now() + warmup;
    let end = start + window;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let target = target.clone();
        let config = config.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                // A task whose last warm-up connection ran past the whole window (a loaded
                // machine, the smoke test's 0.2 s) takes one more, so each leg has a figure.
                if t >= end && (!latencies.is_empty() || t >= end + LATE_SAMPLE_GRACE) {
                    break;
                }
                let mut sender = connect(&target, config.clone(), false).await?;
                let status = sender.get(JSON_PATH, &target.auth).await?;
                if status != 200 {
                    bail!("status {status}");
                }
                drop(sender);
                if t >= start {
                    latencies.push(t.elapsed());
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(summarize(all, window))
}

/// One streamed response: when its first body byte and each event arrived.
#[derive(Debug, Clone, Default)]
pub struct SseRun {
    pub ttfb_us: f64,
    /// Per event: arrival (from sending the request) minus its place in the origin's schedule
    /// (`i * gap`): the time the path adds to each event.
    pub lateness_us: Vec<f64>,
    /// Gaps between consecutive events as received.
    pub gaps_us: Vec<f64>,
}

/// A streamed (SSE) response of `n` events `gap` apart, on a connection set up beforehand.
pub async fn sse(target: &Target, n: usize, gap: Duration) -> anyhow::Result<SseRun> {
    let mut sender = connect(target, tls(target, false, true), false).await?;
    // One request first so the broker's upstream connection is warm, as it is for an agent
    // that has already talked to its provider.
    if sender.get(JSON_PATH, &target.auth).await? != 200 {
        bail!("warm-up request failed");
    }
    let path = format!("/v1/sse?n={n}&gap_ms={}", gap.as_millis());
    let t0 = Instant::now();
    let response = sender.send(&path, &target.auth).await?;
    if response.status() != 200 {
        bail!("status {}", response.status());
    }
    let mut body = response.into_body();
    let mut run = SseRun::default();
    let mut pending = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let at = t0.elapsed();
        if arrivals.is_empty() && run.ttfb_us == 0.0 {
            run.ttfb_us = at.as_secs_f64() * 1e6;
        }
        pending.extend_from_slice(data);
        while let Some(i) = pending.windows(2).position(|w| w == b"\n\n") {
            pending.drain(..i + 2);
            arrivals.push(at);
        }
    }
    if arrivals.len() != n {
        bail!("got {} events, expected {n}", arrivals.len());
    }
    for (i, at) in arrivals.iter().enumerate() {
        let scheduled = gap * i as u32;
        run.lateness_us
            .push((at.as_secs_f64() - scheduled.as_secs_f64()) * 1e6);
        if i > 0 {
            run.gaps_us
                .push((*at - arrivals[i - 1]).as_secs_f64() * 1e6);
        }
    }
    Ok(run)
}

/// Open `n` h1 connections, one request on each (`batch` at a time), call `measure` while they
/// are all open, then close them.
pub async fn hold_open<T>(
    target: &Target,
    n: usize,
    batch: usize,
    measure: impl FnOnce() -> T,
) -> anyhow::Result<T> {
    let config = tls(target, false, true);
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..batch.min(n - open.len()) {
            let target = target.clone();
            let config = config.clone();
            tasks.spawn(async move {
                let mut sender = connect(&target, config, false).await?;
                let status = sender.get(JSON_PATH, &target.auth).await?;
                if status != 200 {
                    bail!("status {status}");
                }
                anyhow::Ok(sender)
            });
        }
        while let Some(r) = tasks.join_next().await {
            open.push(r??);
        }
    }
    // Let the broker settle (buffers released after the requests) before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let value = measure();
    drop(open);
    Ok(value)
}
