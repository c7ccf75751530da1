//! `soak`: mixed load and broken upstreams through `broker serve`, for minutes or hours, and
//! a verdict on whether the broker stayed up, kept its memory and descriptors, and kept the key.
//!
//! ```text
//! scripts/soak [--minutes N]        (= cargo run --release -p broker-bench --bin soak -- ...)
//! ```
//!
//! Starts the bench origin (`bench origin`, as a child of this program) and `broker serve`
//! (temporary `BROKER_HOME`, the made-up key stored with `broker add`), then runs, all at once:
//! HTTP/1.1 and h2 request loops over a mix of paths (JSON, an answer quoting the key, and the
//! origin's faults: a reset mid-body, a body short of its `Content-Length`, bytes that are not
//! HTTP, headers and then a stall longer than the broker's timeouts), SSE readers, WebSocket
//! sessions, and slowloris connections (half a request head, a byte a second; or the run's
//! ticket and then nothing). Every client reaches the broker as the shim does (the fake
//! address and the run's ticket first) and carries the placeholder; the origin answers 401 to
//! anything but the real key.
//!
//! Every `--report-every` seconds it prints a line (requests, faults, errors by kind, the
//! broker's RSS and open descriptors), and at the end a summary. It fails (exit 1, the reasons
//! printed) when:
//! - the broker died (or served nothing for [`WEDGED_AFTER`] while the load ran);
//! - its RSS grew without bound: see [`rss_verdict`];
//! - a descriptor leaked: see [`fd_verdict`];
//! - the key (raw, base64 at any alignment in either alphabet, hex) was in any byte a client
//!   received, or in any file under `BROKER_HOME` (the broker's stderr, the audit log, ...);
//! - the origin got a request without the real key (a swap that did not happen).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use broker_bench::client::{self, Target};
use broker_bench::origin::{
    HOST, JSON_PATH, REAL_KEY, SOAK_ECHO, SOAK_GARBAGE, SOAK_RESET, SOAK_SHORT, SOAK_STALL, SOAK_WS,
};
use broker_bench::procs::{self, OriginProc, Serve};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const USAGE: &str = "usage: soak [--minutes N | --secs S] [--report-every S] [--settle S]
             [--stall-secs S] [--json FILE] [--broker PATH]

  --minutes N       how long the load runs (default 5)
  --secs S          the same in seconds (for a short smoke)
  --report-every S  seconds between progress lines (default 10)
  --settle S        after the load, how long descriptors may take to come back (default 20)
  --stall-secs S    how long the origin's stalled answers stay silent (default 60)
  --json FILE       also write the summary as JSON
  --broker PATH     soak this broker binary (default: the one next to this program)";

/// The broker served nothing at all for this long while the load ran: it is wedged, which
/// counts as dead. Long enough that a machine busy with other work does not trip it (every
/// loop has a request in flight at any time; a healthy broker answers the JSON ones in
/// milliseconds).
const WEDGED_AFTER: Duration = Duration::from_secs(30);

/// RSS growth allowed between the first third of the load and the last third (their peaks)
/// before growth counts as unbounded, when the last third still climbs. The allocator's
/// caches, the upstream pool (at most 64 connections) and the TLS session caches fill in the
/// first minutes and then stay level, well below this; a leak of even one small allocation
/// per request (64 bytes) passes it within the 30-minute run's last two thirds (some
/// millions of requests).
const RSS_GROWTH_LIMIT_MIB: f64 = 32.0;

/// Descriptors the broker may hold after the load beyond its baseline, besides its idle
/// upstream connections: a few come and go on their own (the audit file reopened, a DNS
/// socket, the control socket's client of the moment).
const FD_MARGIN: usize = 8;

/// The most idle upstream connections the broker's pool keeps for one upstream
/// (`MAX_IDLE_PER_UPSTREAM` in broker/src/proxy/pool.rs); the soak has one upstream.
const POOL_MAX_IDLE: usize = 64;

/// How long a client waits for any one answer before it gives up (a timeout, by kind). The
/// stalled answers hit it by design: the origin stays silent for `--stall-secs`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const STALL_PATIENCE: Duration = Duration::from_secs(3);

/// The client mix.
const H1_LOOPS: usize = 4;
const H2_CONNS: usize = 2;
const H2_STREAMS: usize = 4;
const SSE_LOOPS: usize = 2;
const WS_LOOPS: usize = 2;
const SLOWLORIS: usize = 32;
/// Pause between one loop's requests: the machine is shared, and a steady load finds leaks as
/// well as a flat-out one does.
const THINK: Duration = Duration::from_millis(2);

struct Opts {
    load: Duration,
    report_every: Duration,
    settle: Duration,
    stall_secs: u64,
    json: Option<PathBuf>,
    broker: Option<PathBuf>,
}

fn parse_opts(args: &[String]) -> anyhow::Result<Opts> {
    let mut opts = Opts {
        load: Duration::from_secs(300),
        report_every: Duration::from_secs(10),
        settle: Duration::from_secs(20),
        stall_secs: 60,
        json: None,
        broker: None,
    };
    let mut it = args.iter();
    let secs = |v: Option<&String>, what: &str| -> anyhow::Result<Duration> {
        Ok(Duration::from_secs_f64(
            v.with_context(|| format!("{what} N"))?.parse()?,
        ))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => opts.load = secs(it.next(), "--minutes")? * 60,
            "--secs" => opts.load = secs(it.next(), "--secs")?,
            "--report-every" => opts.report_every = secs(it.next(), "--report-every")?,
            "--settle" => opts.settle = secs(it.next(), "--settle")?,
            "--stall-secs" => {
                opts.stall_secs = it.next().context("--stall-secs S")?.parse()?;
            }
            "--json" => opts.json = Some(it.next().context("--json FILE")?.into()),
            "--broker" => opts.broker = Some(it.next().context("--broker PATH")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        opts.report_every >= Duration::from_millis(100),
        "--report-every too small"
    );
    Ok(opts)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The origin runs as a child of this same program (see `OriginProc`).
    if args.first().map(String::as_str) == Some("origin") {
        return match broker_bench::origin::main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("soak origin: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The key in each form the broker redacts and a leak would take. Base64 comes at three
/// alignments (the key's place in the encoded text shifts its encoding), each cut to the
/// characters that depend on the key's bytes alone.
fn needles() -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine as _;
    let key = REAL_KEY.as_bytes();
    let mut out = vec![
        ("raw", key.to_vec()),
        (
            "hex",
            key.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        ),
        (
            "HEX",
            key.iter()
                .map(|b| format!("{b:02X}"))
                .collect::<String>()
                .into_bytes(),
        ),
    ];
    for (name, engine) in [
        ("base64", &base64::engine::general_purpose::STANDARD),
        ("base64url", &base64::engine::general_purpose::URL_SAFE),
    ] {
        for offset in 0..3 {
            let mut input = vec![0u8; offset];
            input.extend_from_slice(key);
            let encoded = engine.encode(&input);
            // The first group holds the padding bytes, the last may hold the end's padding.
            let stable = &encoded.as_bytes()[4..encoded.len() - 4];
            out.push((name, stable.to_vec()));
        }
    }
    out
}

fn find_leak(needles: &[(&'static str, Vec<u8>)], bytes: &[u8]) -> Option<&'static str> {
    needles
        .iter()
        .find(|(_, n)| bytes.windows(n.len()).any(|w| w == n.as_slice()))
        .map(|(name, _)| *name)
}

/// What the clients saw, shared by all of them.
#[derive(Default)]
struct Stats {
    /// Answers that came back as they should, by kind.
    ok: Mutex<BTreeMap<String, u64>>,
    /// The fault paths' outcomes (expected to fail; how they failed), by path and outcome.
    faults: Mutex<BTreeMap<String, u64>>,
    /// What went wrong where nothing should have, by kind.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Where the key reached a client (never the key itself).
    leaks: Mutex<BTreeMap<String, u64>>,
    ok_total: AtomicU64,
    slow_opened: AtomicU64,
    /// Slowloris connections the broker closed, and how long each was held (ms).
    slow_closed: Mutex<Vec<u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: impl Into<String>) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key.into()).or_default() += 1;
    }
}

fn snapshot(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    map.lock().map(|m| m.clone()).unwrap_or_default()
}

fn total(map: &BTreeMap<String, u64>) -> u64 {
    map.values().sum()
}

struct Ctx {
    target: Target,
    stats: Stats,
    needles: Vec<(&'static str, Vec<u8>)>,
    stop: AtomicBool,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn ok(&self, kind: &str) {
        self.stats.ok_total.fetch_add(1, Ordering::Relaxed);
        bump(&self.stats.ok, kind);
    }
    fn error(&self, kind: String) {
        bump(&self.stats.errors, kind);
    }
    fn check(&self, what: &str, bytes: &[u8]) {
        if let Some(form) = find_leak(&self.needles, bytes) {
            bump(&self.stats.leaks, format!("{what}: {form}"));
        }
    }
}

/// A short name for what went wrong, for the error tallies.
fn kind(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return "closed mid-answer".into();
            }
            if h.is_parse() {
                return "unparsable answer".into();
            }
            if h.is_canceled() {
                return "canceled".into();
            }
            if h.is_closed() {
                return "connection closed".into();
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionReset => "reset".into(),
                ConnectionRefused => "refused".into(),
                ConnectionAborted => "aborted".into(),
                UnexpectedEof => "unexpected eof".into(),
                BrokenPipe => "broken pipe".into(),
                TimedOut => "timeout".into(),
                other => format!("io: {other:?}"),
            };
        }
    }
    let text = format!("{}", e.root_cause());
    if text.contains("stream error") || text.contains("RST_STREAM") {
        return "h2 stream reset".into();
    }
    let text: String = text.chars().take(48).collect();
    text
}

/// A small deterministic generator for the path mix (no `rand` dependency for this).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A path: mostly the plain JSON answer, and each fault and the echo now and then.
    fn path(&mut self) -> &'static str {
        match self.next() % 100 {
            0..=59 => JSON_PATH,
            60..=69 => SOAK_ECHO,
            70..=77 => SOAK_RESET,
            78..=85 => SOAK_SHORT,
            86..=93 => SOAK_GARBAGE,
            _ => SOAK_STALL,
        }
    }
}

/// One request on `sender` and its tally. Returns whether the connection should be replaced.
async fn one_request(ctx: &Ctx, sender: &mut client::Sender, path: &str, proto: &str) -> bool {
    let patience = if path == SOAK_STALL {
        STALL_PATIENCE
    } else {
        REQUEST_TIMEOUT
    };
    let result = tokio::time::timeout(patience, sender.fetch(path, &ctx.target.auth)).await;
    let name = path.rsplit('/').next().unwrap_or(path);
    let outcome = match &result {
        Ok(Ok((status, bytes))) => {
            ctx.check(&format!("{proto} {name} answer"), bytes);
            Ok(*status)
        }
        Ok(Err(e)) => Err(kind(e)),
        Err(_) => Err("timeout".to_string()),
    };
    let fault = matches!(path, SOAK_RESET | SOAK_SHORT | SOAK_GARBAGE | SOAK_STALL);
    match (fault, outcome) {
        (false, Ok(200)) => ctx.ok(&format!("{proto} {name}")),
        (false, Ok(401)) => ctx.error(format!("{proto} {name}: 401 (the swap did not happen)")),
        (false, Ok(status)) => ctx.error(format!("{proto} {name}: status {status}")),
        (false, Err(k)) => ctx.error(format!("{proto} {name}: {k}")),
        // A fault path that came back whole would mean the fault never happened.
        (true, Ok(200)) => ctx.error(format!("{proto} {name}: 200 with a whole body")),
        (true, Ok(status)) => bump(&ctx.stats.faults, format!("{name}: {status}")),
        (true, Err(k)) => bump(&ctx.stats.faults, format!("{name}: {k}")),
    }
    // A timed-out HTTP/1.1 request leaves its connection mid-answer: start afresh.
    result.is_err() || sender.is_closed()
}

/// Keep-alive requests on one connection at a time (h1), or `streams` at once on one (h2),
/// over the path mix; a connection that broke is replaced.
async fn request_loop(ctx: Arc<Ctx>, h2: bool, streams: usize, seed: u64) {
    let proto = if h2 { "h2" } else { "h1" };
    let mut mix = Mix(seed);
    while !ctx.stopped() {
        let sender =
            tokio::time::timeout(REQUEST_TIMEOUT, client::connect_sender(&ctx.target, h2)).await;
        let sender = match sender {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                ctx.error(format!("{proto} connect: {}", kind(&e)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                ctx.error(format!("{proto} connect: timeout"));
                continue;
            }
        };
        let mut lanes = tokio::task::JoinSet::new();
        let mut senders = vec![sender];
        for _ in 1..streams {
            if let Some(clone) = senders[0].try_clone() {
                senders.push(clone);
            }
        }
        for mut sender in senders {
            let ctx = ctx.clone();
            let mut mix = Mix(mix.next() | 1);
            lanes.spawn(async move {
                while !ctx.stopped() {
                    let path = mix.path();
                    if one_request(&ctx, &mut sender, path, proto).await {
                        break;
                    }
                    tokio::time::sleep(THINK).await;
                }
            });
        }
        // For h2 the connection is replaced once every lane has left it (a lane leaves after
        // a timeout; the others go on meanwhile).
        while lanes.join_next().await.is_some() {}
    }
}

/// SSE: a stream of 10 events 20 ms apart, over h1 and h2 in turn; all 10 must arrive.
async fn sse_loop(ctx: Arc<Ctx>, seed: u64) {
    let mut h2 = seed & 1 == 0;
    const EVENTS: usize = 10;
    let path = format!("/v1/sse?n={EVENTS}&gap_ms=20");
    while !ctx.stopped() {
        h2 = !h2;
        let proto = if h2 { "h2" } else { "h1" };
        let work = async {
            let mut sender = client::connect_sender(&ctx.target, h2).await?;
            let mut streams = 0;
            while !ctx.stopped() && streams < 20 {
                let (status, bytes) = sender.fetch(&path, &ctx.target.auth).await?;
                ctx.check(&format!("{proto} sse"), &bytes);
                let events = bytes.windows(6).filter(|w| w == b"data: ").count();
                if status == 200 && events == EVENTS {
                    ctx.ok(&format!("{proto} sse stream"));
                } else {
                    ctx.error(format!("{proto} sse: status {status}, {events} events"));
                }
                streams += 1;
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(REQUEST_TIMEOUT * 6, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => ctx.error(format!("{proto} sse: {}", kind(&e))),
            Err(_) => ctx.error(format!("{proto} sse: timeout")),
        }
    }
}

/// WebSocket sessions: 10 echoes and a `whoami` (which the origin answers with the key, for
/// the broker to overwrite), then a close; again.
async fn ws_loop(ctx: Arc<Ctx>) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let mut n = 0u64;
    while !ctx.stopped() {
        let work = async {
            let tls = client::connect_tls(&ctx.target, false).await?;
            let request = http::Request::builder()
                .uri(format!("wss://{HOST}{SOAK_WS}"))
                .header("host", HOST)
                .header("authorization", &ctx.target.auth)
                .header(
                    "sec-websocket-key",
                    tokio_tungstenite::tungstenite::handshake::client::generate_key(),
                )
                .header("sec-websocket-version", "13")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .body(())?;
            let (mut ws, response) = tokio_tungstenite::client_async(request, tls).await?;
            anyhow::ensure!(response.status() == 101, "status {}", response.status());
            for i in 0..11 {
                let text = if i == 10 {
                    "whoami".to_string()
                } else {
                    n += 1;
                    format!("message {n}")
                };
                ws.send(Message::text(text.clone())).await?;
                let reply = loop {
                    match ws.next().await.context("closed")?? {
                        Message::Text(t) => break t.to_string(),
                        Message::Binary(b) => break String::from_utf8_lossy(&b).into_owned(),
                        _ => continue,
                    }
                };
                ctx.check("ws message", reply.as_bytes());
                anyhow::ensure!(i == 10 || reply == text, "echo {reply:?} for {text:?}");
            }
            ws.close(None).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
            Ok(Ok(())) => ctx.ok("ws session"),
            Ok(Err(e)) => ctx.error(format!("ws: {}", kind(&e))),
            Err(_) => ctx.error("ws: timeout".into()),
        }
        tokio::time::sleep(THINK).await;
    }
}

/// A slowloris connection, again and again: after TLS, half a request head a byte a second
/// (odd ids), or the run's ticket and then silence, before TLS (even ids). Each is held until
/// the broker closes it; how long that took is kept.
async fn slowloris(ctx: Arc<Ctx>, id: usize) {
    let head = format!("GET {JSON_PATH} HTTP/1.1\r\nhost: {HOST}\r\nx-slow: ");
    while !ctx.stopped() {
        let opened = Instant::now();
        let held = async {
            let mut received = Vec::new();
            if id % 2 == 1 {
                let mut tls = client::connect_tls(&ctx.target, false).await?;
                ctx.stats.slow_opened.fetch_add(1, Ordering::Relaxed);
                let bytes = head
                    .as_bytes()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(b'a'));
                let mut buf = [0u8; 4096];
                for b in bytes {
                    tokio::select! {
                        read = tls.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => received.extend_from_slice(&buf[..n]),
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if tls.write_all(&[b]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            } else {
                let mut tcp = client::connect_tcp(&ctx.target).await?;
                ctx.stats.slow_opened.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
            }
            anyhow::Ok(received)
        };
        tokio::select! {
            result = held => match result {
                Ok(received) => {
                    ctx.check("slowloris", &received);
                    if let Ok(mut v) = ctx.stats.slow_closed.lock() {
                        v.push(opened.elapsed().as_millis() as u64);
                    }
                }
                Err(e) => ctx.error(format!("slowloris connect: {}", kind(&e))),
            },
            _ = async { while !ctx.stopped() { tokio::time::sleep(Duration::from_millis(200)).await } } => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The broker's descriptors: all of them, its client-side TCP connections (local port = its
/// listener's), and its connections to the origin.
#[derive(Debug, Clone, Copy, Default)]
struct Fds {
    total: usize,
    agent: usize,
    upstream: usize,
}

fn fds(pid: u32, listen_port: u16, origin_port: u16) -> anyhow::Result<Fds> {
    let mut inodes = std::collections::HashSet::new();
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        total += 1;
        if let Ok(link) = std::fs::read_link(entry.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
    }
    let (mut agent, mut upstream) = (0, 0);
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            // State 0A is LISTEN: the listener itself is neither.
            if f[3] == "0A" {
                continue;
            }
            if port(f[1]) == Some(listen_port) {
                agent += 1;
            } else if port(f[2]) == Some(origin_port) {
                upstream += 1;
            }
        }
    }
    Ok(Fds {
        total,
        agent,
        upstream,
    })
}

/// RSS growth is unbounded when the last third of the load's peak exceeds the first third's
/// by more than [`RSS_GROWTH_LIMIT_MIB`] and the last third still climbs (a least-squares
/// slope above zero). Both, because each alone misleads: a plateau reached late (caches
/// filling under a burst) is a step, not a leak, and a slope alone is noise on a level
/// line. Returns (first third's peak, last third's peak, last third's slope in MiB/min, fail).
fn rss_verdict(samples: &[(f64, f64)]) -> (f64, f64, f64, bool) {
    if samples.len() < 3 {
        return (0.0, 0.0, 0.0, false);
    }
    let (t0, t1) = (samples[0].0, samples[samples.len() - 1].0);
    let third = (t1 - t0) / 3.0;
    let first: Vec<_> = samples.iter().filter(|s| s.0 <= t0 + third).collect();
    let last: Vec<_> = samples.iter().filter(|s| s.0 >= t1 - third).collect();
    let peak = |v: &[&(f64, f64)]| v.iter().map(|s| s.1).fold(0.0, f64::max);
    let (a, c) = (peak(&first), peak(&last));
    let n = last.len() as f64;
    let (mx, my) = (
        last.iter().map(|s| s.0).sum::<f64>() / n,
        last.iter().map(|s| s.1).sum::<f64>() / n,
    );
    let (mut num, mut den) = (0.0, 0.0);
    for s in &last {
        num += (s.0 - mx) * (s.1 - my);
        den += (s.0 - mx) * (s.0 - mx);
    }
    let slope = if den > 0.0 { num / den * 60.0 } else { 0.0 };
    (a, c, slope, c - a > RSS_GROWTH_LIMIT_MIB && slope > 0.0)
}

/// After the load and every client connection are gone and the settle period has passed, a
/// descriptor leaked when the broker still holds a connection from a client, more idle
/// upstream connections than its pool keeps, or other descriptors beyond its baseline (before
/// any load) plus [`FD_MARGIN`]. Returns the reason, if it failed.
fn fd_verdict(baseline: usize, after: Fds) -> Option<String> {
    let other = after.total - after.agent - after.upstream;
    if after.agent > 0 {
        return Some(format!(
            "the broker still holds {} client connections after every client closed",
            after.agent
        ));
    }
    if after.upstream > POOL_MAX_IDLE {
        return Some(format!(
            "the broker holds {} upstream connections, more than its pool keeps ({POOL_MAX_IDLE})",
            after.upstream
        ));
    }
    if other > baseline + FD_MARGIN {
        return Some(format!(
            "the broker holds {other} descriptors besides its upstream pool, {baseline} before the load (margin {FD_MARGIN})"
        ));
    }
    None
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (all CPU ticks, steal ticks) since boot.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    Some((f.iter().sum(), *f.get(7)?))
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat`.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => all_files(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

fn fmt_map(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes the soak's temporary directory on every exit path.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(opts: Opts) -> anyhow::Result<bool> {
    let broker = match &opts.broker {
        Some(path) => path.clone(),
        None => procs::target_dir()?.join("broker"),
    };
    anyhow::ensure!(
        broker.exists(),
        "{} missing: cargo build -p broker-cli",
        broker.display()
    );
    // The broker inherits this; `broker serve` raises its own limit anyway.
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            limit.current = limit.maximum;
            let _ = setrlimit(Resource::Nofile, limit);
        }
    }
    let tmp = TempDir(std::env::temp_dir().join(format!("broker-soak-{}", std::process::id())));
    std::fs::create_dir_all(&tmp.0)?;
    // A copy, so a build finishing during the run cannot swap the binary under it.
    procs::snapshot_from(&broker, &tmp.0.join("bin"))?;
    let origin = OriginProc::start_with(
        &tmp.0.join("origin"),
        "127.0.0.1:0",
        &[],
        &["--stall-secs", &opts.stall_secs.to_string()],
    )?;
    let mut serve = Serve::start(
        &tmp.0.join("home"),
        &origin.ca_pem_path,
        &origin.addr.to_string(),
    )?;
    let pid = serve.pid();
    let addr = serve.addr()?;
    let target = Target {
        addr,
        ca_pem: serve.ca_pem()?,
        auth: format!("Bearer {}", serve.placeholder()?),
        preamble: serve.config.ticket.as_ref().map(|t| t.preamble()),
    };
    let ctx = Arc::new(Ctx {
        target,
        stats: Stats::default(),
        needles: needles(),
        stop: AtomicBool::new(false),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (listen_port, origin_port) = (addr.port(), origin.addr.port());
    std::thread::sleep(Duration::from_millis(300));
    let baseline = fds(pid, listen_port, origin_port)?;
    let rss_start = procs::rss_kib(pid)? as f64 / 1024.0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_start = loadavg();
    let ticks_start = cpu_ticks();
    let cpu_start = cpu_secs(pid);
    println!(
        "soak: broker serve pid {pid}, origin pid {}; load for {:.0} s, a line every {:.0} s; \
         {cores} cores, load average {load_start}",
        origin.pid(),
        opts.load.as_secs_f64(),
        opts.report_every.as_secs_f64()
    );
    println!(
        "soak: baseline rss {rss_start:.1} MiB, {} descriptors",
        baseline.total
    );
    let mut failures: Vec<String> = Vec::new();
    let mut rss_samples: Vec<(f64, f64)> = Vec::new();
    let mut fd_peak = baseline;
    let mut rss_peak = rss_start;
    let started = Instant::now();
    let mut load_secs = 0.0;

    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..H1_LOOPS {
            tasks.spawn(request_loop(ctx.clone(), false, 1, 0x9E37_79B9 + i as u64));
        }
        for i in 0..H2_CONNS {
            tasks.spawn(request_loop(ctx.clone(), true, H2_STREAMS, 0x7F4A_7C15 + i as u64));
        }
        for i in 0..SSE_LOOPS {
            tasks.spawn(sse_loop(ctx.clone(), i as u64));
        }
        for _ in 0..WS_LOOPS {
            tasks.spawn(ws_loop(ctx.clone()));
        }
        for i in 0..SLOWLORIS {
            tasks.spawn(slowloris(ctx.clone(), i));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_report = started + opts.report_every;
        let (mut last_ok, mut last_report) = (0u64, started);
        let mut last_progress = (Instant::now(), 0u64);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let t = now.duration_since(started).as_secs_f64();
            if let Some(status) = serve.exited() {
                failures.push(format!("the broker died after {t:.0} s ({status})"));
                break;
            }
            let ok = ctx.stats.ok_total.load(Ordering::Relaxed);
            if ok != last_progress.1 {
                last_progress = (now, ok);
            } else if now.duration_since(last_progress.0) >= WEDGED_AFTER {
                failures.push(format!(
                    "the broker served nothing for {} s (at {t:.0} s)",
                    WEDGED_AFTER.as_secs()
                ));
                break;
            }
            if let Ok(kib) = procs::rss_kib(pid) {
                let mib = kib as f64 / 1024.0;
                rss_peak = rss_peak.max(mib);
                rss_samples.push((t, mib));
            }
            let f = fds(pid, listen_port, origin_port).unwrap_or_default();
            if f.total > fd_peak.total {
                fd_peak = f;
            }
            if now >= next_report {
                next_report += opts.report_every;
                let faults = total(&snapshot(&ctx.stats.faults));
                let errors = snapshot(&ctx.stats.errors);
                let rate = (ok - last_ok) as f64 / now.duration_since(last_report).as_secs_f64();
                (last_ok, last_report) = (ok, now);
                let slow_closed = ctx.stats.slow_closed.lock().map(|v| v.len()).unwrap_or(0);
                println!(
                    "[{t:6.0}s] ok {ok} ({rate:.0}/s) | faults {faults} | errors {} ({}) | \
                     rss {:.1} MiB | fds {} (clients {}, upstream {}) | slowloris closed {slow_closed} | load {}",
                    total(&errors),
                    fmt_map(&errors),
                    rss_samples.last().map_or(0.0, |s| s.1),
                    f.total,
                    f.agent,
                    f.upstream,
                    loadavg(),
                );
            }
            if now.duration_since(started) >= opts.load {
                break;
            }
        }
        load_secs = started.elapsed().as_secs_f64();
        ctx.stop.store(true, Ordering::Relaxed);
        // Every loop checks the flag between requests; the ones waiting on a stalled answer
        // or a slowloris read are cut off after a second. Either way their connections close.
        let grace = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut grace => { tasks.abort_all(); while tasks.join_next().await.is_some() {} break }
            }
        }
    });
    let cpu_used = cpu_secs(pid) - cpu_start;

    // Settle: the broker should let go of every client connection right away, and its other
    // descriptors should be back near the baseline.
    let settle_start = Instant::now();
    let mut after = Fds::default();
    let alive = serve.exited().is_none();
    if alive {
        loop {
            after = fds(pid, listen_port, origin_port).unwrap_or_default();
            if fd_verdict(baseline.total, after).is_none() || settle_start.elapsed() >= opts.settle
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if let Some(why) = fd_verdict(baseline.total, after) {
            failures.push(format!(
                "descriptor leak, {:.0} s after the load: {why}",
                settle_start.elapsed().as_secs_f64()
            ));
        }
    } else if failures.is_empty() {
        failures.push("the broker died".into());
    }
    let settled_in = settle_start.elapsed().as_secs_f64();
    let rss_after = procs::rss_kib(pid)
        .map(|k| k as f64 / 1024.0)
        .unwrap_or(0.0);
    let (first_peak, last_peak, slope, grew) = rss_verdict(&rss_samples);
    if grew {
        failures.push(format!(
            "RSS grew without bound: peak {first_peak:.1} MiB in the first third, {last_peak:.1} MiB in the last, still climbing {slope:.2} MiB/min"
        ));
    }

    // The key: in what the clients got, and in every file the broker wrote.
    let leaks = snapshot(&ctx.stats.leaks);
    if !leaks.is_empty() {
        failures.push(format!("the key reached a client: {}", fmt_map(&leaks)));
    }
    let mut files = Vec::new();
    all_files(&serve.home, &mut files);
    let mut scanned = 0;
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        scanned += 1;
        if let Some(form) = find_leak(&ctx.needles, &bytes) {
            failures.push(format!(
                "the key ({form}) is in {}",
                file.strip_prefix(&serve.home).unwrap_or(file).display()
            ));
        }
    }
    let refused = origin.refused();
    if refused > 0 {
        failures.push(format!(
            "the origin got {refused} requests without the real key (swaps that did not happen)"
        ));
    }
    let audit_lines = std::fs::read_to_string(serve.home.join("audit.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0);

    let ok = snapshot(&ctx.stats.ok);
    let faults = snapshot(&ctx.stats.faults);
    let errors = snapshot(&ctx.stats.errors);
    let slow_closed = ctx
        .stats
        .slow_closed
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let slow_median = {
        let mut v = slow_closed.clone();
        v.sort_unstable();
        v.get(v.len() / 2).map(|ms| *ms as f64 / 1000.0)
    };
    let steal = match (ticks_start, cpu_ticks()) {
        (Some((a, sa)), Some((b, sb))) if b > a => Some(100.0 * (sb - sa) as f64 / (b - a) as f64),
        _ => None,
    };
    let load_end = loadavg();
    let ok_total = total(&ok);

    println!("\nsoak summary");
    println!("  load ran          {load_secs:.0} s on {cores} cores; load average {load_start} at start, {load_end} at end; hypervisor steal {}",
        steal.map_or("unknown".into(), |s| format!("{s:.1}%")));
    println!(
        "  broker CPU        {cpu_used:.0} s ({:.0}% of one core)",
        100.0 * cpu_used / load_secs.max(1.0)
    );
    println!(
        "  requests ok       {ok_total} ({:.0}/s): {}",
        ok_total as f64 / load_secs.max(1.0),
        fmt_map(&ok)
    );
    println!(
        "  faults answered   {}: {}",
        total(&faults),
        fmt_map(&faults)
    );
    println!(
        "  errors            {}: {}",
        total(&errors),
        fmt_map(&errors)
    );
    println!(
        "  slowloris         {} opened, {} closed by the broker (median held {})",
        ctx.stats.slow_opened.load(Ordering::Relaxed),
        slow_closed.len(),
        slow_median.map_or("-".into(), |s| format!("{s:.1} s"))
    );
    println!(
        "  rss               {rss_start:.1} MiB at start, peak {rss_peak:.1}; first third peak {first_peak:.1}, last third peak {last_peak:.1} (slope {slope:+.2} MiB/min); {rss_after:.1} after the load"
    );
    println!(
        "  descriptors       {} at start, peak {} (clients {}, upstream {}); {} {settled_in:.1} s after the load (clients {}, upstream {})",
        baseline.total, fd_peak.total, fd_peak.agent, fd_peak.upstream, after.total, after.agent, after.upstream
    );
    println!(
        "  key               not in any answer, WebSocket message or slowloris read ({} forms checked), nor in the {scanned} files of BROKER_HOME ({audit_lines} audit lines){}",
        ctx.needles.len(),
        if leaks.is_empty() { "" } else { ": SEE FAILURES" }
    );
    println!("  origin refusals   {refused}");
    if let Some(path) = &opts.json {
        let report = json!({
            "load_secs": load_secs, "cores": cores, "loadavg_start": load_start,
            "loadavg_end": load_end, "steal_pct": steal, "broker_cpu_secs": cpu_used,
            "ok": ok, "ok_total": ok_total, "faults": faults, "errors": errors,
            "slowloris_opened": ctx.stats.slow_opened.load(Ordering::Relaxed),
            "slowloris_closed": slow_closed.len(),
            "rss_mib": { "start": rss_start, "peak": rss_peak, "first_third_peak": first_peak,
                "last_third_peak": last_peak, "slope_per_min": slope, "after": rss_after },
            "fds": { "baseline": baseline.total, "peak": fd_peak.total,
                "after": after.total, "after_clients": after.agent, "after_upstream": after.upstream },
            "files_scanned": scanned, "origin_refused": refused, "failures": failures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(true)
    } else {
        for f in &failures {
            println!("soak: FAIL: {f}");
        }
        if serve.exited().is_some() {
            let stderr = serve.stderr();
            if find_leak(&ctx.needles, stderr.as_bytes()).is_none() {
                let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
                eprintln!("broker stderr (last lines):");
                for line in tail.iter().rev() {
                    eprintln!("  {line}");
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leak check sees each form the origin's echo answer quotes the key in (raw, base64
    /// of the key, base64 of `user:KEY` at another alignment), and nothing in a redacted one.
    #[test]
    fn the_key_check_finds_each_form_the_origin_quotes() {
        let needles = needles();
        let body = broker_bench::origin::echo_body();
        assert_eq!(find_leak(&needles, body.as_bytes()), Some("raw"));
        let without_raw = body.replace(REAL_KEY, "[redacted]");
        assert_eq!(find_leak(&needles, without_raw.as_bytes()), Some("base64"));
        use base64::Engine as _;
        for prefix in ["", "u", "us", "user:"] {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{REAL_KEY}"));
            assert!(
                find_leak(&needles, encoded.as_bytes()).is_some(),
                "base64 after {prefix:?}"
            );
            let url =
                base64::engine::general_purpose::URL_SAFE.encode(format!("{prefix}{REAL_KEY}"));
            assert!(
                find_leak(&needles, url.as_bytes()).is_some(),
                "base64url after {prefix:?}"
            );
        }
        assert_eq!(
            find_leak(&needles, b"you are Bearer [redacted-by-broker]"),
            None
        );
    }

    #[test]
    fn rss_growth_fails_only_when_large_and_still_climbing() {
        let series = |f: &dyn Fn(f64) -> f64| -> Vec<(f64, f64)> {
            (0..1800).map(|t| (t as f64, f(t as f64))).collect()
        };
        // Level after a warm-up step: passes.
        assert!(!rss_verdict(&series(&|t| if t < 60.0 { 20.0 } else { 60.0 })).3);
        // A steady leak of 0.05 MiB/s: fails.
        assert!(rss_verdict(&series(&|t| 20.0 + 0.05 * t)).3);
        // Grew a lot but came back down at the end (falling): passes.
        assert!(
            !rss_verdict(&series(&|t| if t < 1500.0 {
                20.0 + 0.05 * t
            } else {
                30.0
            }))
            .3
        );
    }

    #[test]
    fn descriptors_left_open_fail() {
        let clean = Fds {
            total: 70,
            agent: 0,
            upstream: 10,
        };
        assert_eq!(fd_verdict(58, clean), None);
        assert!(fd_verdict(
            58,
            Fds {
                total: 71,
                agent: 1,
                upstream: 10
            }
        )
        .is_some());
        assert!(fd_verdict(
            58,
            Fds {
                total: 100,
                agent: 0,
                upstream: 10
            }
        )
        .is_some());
        assert!(fd_verdict(
            58,
            Fds {
                total: 200,
                agent: 0,
                upstream: 65
            }
        )
        .is_some());
    }
}
