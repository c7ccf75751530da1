//! The integration harness: local TLS origins with their own test CA, the real `broker`
//! binary with a temporary `BROKER_HOME`, and a client that connects the way the shim makes
//! agents connect (to the run's fake address, opening with the run's ticket, with the real
//! hostname as SNI).
//!
//! Everything listens on port 0; upstream hostnames are the real ones (`api.openai.com`),
//! pinned for the broker with `--resolve` and trusted with `--upstream-ca`.

pub mod connect_proxy;
pub mod fake_llm;
pub mod oauth;
pub mod origin;
pub mod websocket;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_contract::{run_ipv4, ShimConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub use origin::{Origin, OriginRequest, Reply};

/// The CA variables this machine exports to every process; scrubbed from every child the
/// harness starts unless a test sets them on purpose.
pub const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "PIP_CERT",
    "HTTPLIB2_CA_CERTS",
    "NIX_SSL_CERT_FILE",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
];

/// `target/debug` (or whichever profile the tests were built with).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The `broker` binary, built by `cargo build --workspace` (the README's test command).
pub fn broker_bin() -> PathBuf {
    let path = target_dir().join("broker");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// `libbroker.so`, built by `cargo build --workspace`.
pub fn shim_lib() -> PathBuf {
    let path = target_dir().join("libbroker.so");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// A CA for test origins, standing in for the public CAs real providers use.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem_path: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "broker test upstream CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("ca");
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let pem_path = dir.path().join("upstream-ca.pem");
        std::fs::write(&pem_path, cert.pem()).expect("write ca");
        TestCa {
            cert,
            key,
            pem_path,
            _dir: dir,
        }
    }

    /// A server certificate chain and key for `names`.
    pub fn leaf(
        &self,
        names: &[&str],
    ) -> (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ) {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (vec![cert.der().clone()], key_der)
    }

    /// A server certificate and key for `names` as PEM text, for origins that read files
    /// (moto's `--ssl-cert`/`--ssl-key`).
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// A temporary `BROKER_HOME` with a key file as the vault's key source.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `broker` command with this home and a scrubbed environment.
    pub fn broker(&self) -> Command {
        let mut cmd = Command::new(broker_bin());
        scrub(&mut cmd);
        cmd.env("BROKER_HOME", self.path())
            .env("BROKER_KEY_SOURCE", "file")
            .env("BROKER_LOG", "info");
        cmd
    }

    /// `broker run` (embedded broker) for this home with `host` resolved to a local `origin`
    /// trusted through `ca`; append `--` and the agent's command.
    pub fn broker_run(&self, ca: &TestCa, host: &str, origin: SocketAddr) -> Command {
        let mut cmd = self.broker();
        cmd.arg("run")
            .arg("--upstream-ca")
            .arg(&ca.pem_path)
            .arg("--resolve")
            .arg(format!("{host}:443:{origin}"))
            .stdin(Stdio::null());
        cmd
    }

    /// `broker <args>` (no stdin, 30 s at most), which must succeed; its output.
    pub fn broker_ok(&self, args: &[&str]) -> Output {
        let out = run_bounded(
            self.broker().args(args).stdin(Stdio::null()),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "broker {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The placeholder the broker gives agents for `provider`, from the catalog.
    pub fn placeholder(&self, provider: &str) -> String {
        let out = self.broker_ok(&["providers", "show", provider, "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("providers json");
        json["placeholder"]
            .as_str()
            .expect("placeholder")
            .to_string()
    }

    /// `broker add <provider>` with the secret on stdin.
    pub fn add(&self, provider: &str, secret: &str) {
        let out = self.run_with_stdin(&["add", provider], secret);
        assert!(
            out.status.success(),
            "broker add {provider} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .broker()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn broker");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    }

    /// The audit log once `done` holds for it (or after 10 s): a running broker writes its
    /// events from a background thread in small batches, a few milliseconds after the request.
    pub fn audit_until(&self, done: impl Fn(&str) -> bool) -> String {
        let path = self.path().join("audit.jsonl");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if done(&text) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything under the home directory, for leak checks.
    pub fn all_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        collect_bytes(self.path(), &mut out);
        out
    }
}

impl Default for Home {
    fn default() -> Self {
        Home::new()
    }
}

fn collect_bytes(dir: &Path, out: &mut Vec<u8>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_bytes(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend_from_slice(&bytes);
        }
    }
}

/// The system CA bundle this machine's CA variables point at.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Set every CA variable to the system bundle, as this machine does for every process: the
/// "preset" half of each client test (the other half runs with them scrubbed).
pub fn preset_ca_vars(cmd: &mut Command) {
    for var in CA_VARS {
        cmd.env(var, SYSTEM_CA_BUNDLE);
    }
    cmd.env("SSL_CERT_DIR", "/etc/ssl/certs");
}

/// Remove the machine's CA variables (and any broker state variables) from a child's env.
pub fn scrub(cmd: &mut Command) {
    for var in CA_VARS {
        cmd.env_remove(var);
    }
    for var in [
        "BROKER_SHIM_CONFIG",
        "LD_PRELOAD",
        "BROKER_RESOLVE",
        "BROKER_UPSTREAM_CA",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "NO_PROXY",
        // A desktop's session bus: approvals would pop real notifications (`broker_cli::notify`).
        "DBUS_SESSION_BUS_ADDRESS",
    ] {
        cmd.env_remove(var);
    }
}

/// The tickets of the runs this test process knows (from the shim configs it read), by the
/// listener they belong to: the harness's client plays the shim, which presents its run's
/// ticket on every connection to the broker. Keyed by (run slot, port) for the fake
/// addresses and (0, port) for `[::1]`.
static TICKETS: std::sync::Mutex<Vec<((u8, u16), broker_contract::Ticket)>> =
    std::sync::Mutex::new(Vec::new());

fn listener_key(addr: SocketAddr) -> (u8, u16) {
    match addr.ip() {
        IpAddr::V4(ip) => (ip.octets()[2], addr.port()),
        IpAddr::V6(_) => (0, addr.port()),
    }
}

/// Remember the ticket of the run `config` describes, so [`connect_as_shim`] presents it.
pub fn register_run(config: &ShimConfig) {
    let Some(ticket) = &config.ticket else { return };
    let mut tickets = TICKETS.lock().unwrap_or_else(|e| e.into_inner());
    let mut keys = vec![(config.slot, config.port)];
    if config.port6 != 0 {
        keys.push((0, config.port6));
    }
    for key in keys {
        tickets.retain(|(k, _)| *k != key);
        tickets.push((key, ticket.clone()));
    }
}

/// The preamble the shim would send to the broker listener at `addr`, if its run is known.
pub fn preamble_for(addr: SocketAddr) -> Option<[u8; broker_contract::TICKET_PREAMBLE_LEN]> {
    let key = listener_key(addr);
    let tickets = TICKETS.lock().unwrap_or_else(|e| e.into_inner());
    tickets
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, t)| t.preamble())
}

/// TCP to a broker listener the way the shim connects: then its run's ticket, if known.
pub async fn connect_as_shim(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    if let Some(preamble) = preamble_for(addr) {
        tcp.write_all(&preamble).await?;
    }
    Ok(tcp)
}

/// [`connect_as_shim`] for blocking callers.
pub fn connect_as_shim_blocking(addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    if let Some(preamble) = preamble_for(addr) {
        tcp.write_all(&preamble)?;
    }
    Ok(tcp)
}

/// A running `broker serve`, killed on drop.
pub struct Serve {
    child: Child,
    pub config: ShimConfig,
    pub config_path: PathBuf,
    stderr_path: PathBuf,
}

impl Serve {
    /// Start `broker serve` for `home`, trusting `ca` upstream and resolving each
    /// `(host, origin address)` to a local origin.
    pub fn start(home: &Home, ca: &TestCa, resolve: &[(&str, SocketAddr)]) -> Serve {
        let mut cmd = home.broker();
        cmd.arg("serve").arg("--upstream-ca").arg(&ca.pem_path);
        for (host, addr) in resolve {
            cmd.arg("--resolve").arg(format!("{host}:443:{addr}"));
        }
        Serve::spawn(home, cmd)
    }

    pub fn spawn(home: &Home, mut cmd: Command) -> Serve {
        let stderr_path = home.path().join("serve.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let config_path = home
            .path()
            .join("run")
            .join(broker_contract::DAEMON_SHIM_CONFIG_FILE);
        let _ = std::fs::remove_file(&config_path);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn broker serve");
        let mut serve = Serve {
            child,
            config: ShimConfig::default(),
            config_path: config_path.clone(),
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&config_path) {
                if let Ok(config) = ShimConfig::parse(&text) {
                    register_run(&config);
                    serve.config = config;
                    return serve;
                }
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!("broker serve exited ({status}): {}", serve.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "broker serve did not start: {}",
                serve.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address the shim would give the agent for `host` (the run's one address, for
    /// every managed host), with the broker's port.
    pub fn addr_for(&self, host: &str) -> SocketAddr {
        assert!(self.config.manages(host), "{host} is not managed");
        self.run_addr()
    }

    /// The run's fake address and the broker's port: where the shim sends every connection
    /// to a managed host.
    pub fn run_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(run_ipv4(self.config.slot)), self.config.port)
    }

    /// The run CA (what the shim makes the agent trust).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.config.ca_file).expect("run ca")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS client config trusting only `ca_pem`, with the given ALPN.
pub fn client_tls(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Run a command with a timeout; panics if it does not finish.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "command timed out after {timeout:?}: {cmd:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How many audit lines of `audit` record an `event` (`credential_use`, `refresh`, ...).
pub fn count_events(audit: &str, event: &str) -> usize {
    let tag = format!("\"event\":\"{event}\"");
    audit.lines().filter(|l| l.contains(&tag)).count()
}

/// Does `haystack` contain `needle`?
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

/// A response as a client saw it.
#[derive(Debug)]
pub struct ClientResponse {
    pub status: u16,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    /// When each body chunk arrived, relative to the response head.
    pub chunk_times: Vec<(Duration, usize)>,
}

impl ClientResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Send one request the way a shimmed agent would: TCP to `addr` (the fake address), TLS
/// with SNI `sni` trusting `ca_pem`, HTTP/2 if `h2` else HTTP/1.1.
pub fn send(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    h2: bool,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<ClientResponse, String> {
    send_blocking(addr, sni, ca_pem, h2, request, None)
}

/// [`send`], counting each body chunk in `delivered` as it arrives (for lock-step origins
/// such as [`Reply::Sse`]).
pub fn send_counting(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    h2: bool,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
    delivered: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<ClientResponse, String> {
    send_blocking(addr, sni, ca_pem, h2, request, Some(delivered))
}

/// Send `requests` on one connection, the way a keep-alive agent does: one after another
/// over HTTP/1.1, all at once over HTTP/2. The responses in the order of the requests.
pub fn send_on_one_connection(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    h2: bool,
    requests: Vec<http::Request<http_body_util::Full<bytes::Bytes>>>,
) -> Result<Vec<ClientResponse>, String> {
    use hyper_util::rt::TokioExecutor;
    if !h2 {
        return send_taking_turns(addr, sni, ca_pem, 1, requests);
    }
    block_on_client(async {
        let io = connect_tls(addr, sni, ca_pem, true).await?;
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let all = requests.into_iter().map(|request| {
            let mut sender = sender.clone();
            async move {
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                read_response(response, None).await
            }
        });
        futures_util::future::join_all(all)
            .await
            .into_iter()
            .collect()
    })
}

/// Open `connections` HTTP/1.1 connections, then send `requests` one after another, each on
/// the next connection in turn: an agent whose keep-alive connections stay open and take
/// turns. The responses in the order of the requests.
pub fn send_taking_turns(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    connections: usize,
    requests: Vec<http::Request<http_body_util::Full<bytes::Bytes>>>,
) -> Result<Vec<ClientResponse>, String> {
    block_on_client(async {
        let mut senders = Vec::with_capacity(connections);
        for _ in 0..connections {
            let io = connect_tls(addr, sni, ca_pem, false).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("h1: {e}"))?;
            tokio::spawn(conn);
            senders.push(sender);
        }
        let mut responses = Vec::new();
        for (request, turn) in requests.into_iter().zip((0..connections).cycle()) {
            let sender = &mut senders[turn];
            sender.ready().await.map_err(|e| format!("ready: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            responses.push(read_response(response, None).await?);
        }
        Ok(responses)
    })
}

fn send_blocking(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    h2: bool,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
    delivered: Option<Arc<std::sync::atomic::AtomicUsize>>,
) -> Result<ClientResponse, String> {
    block_on_client(send_async(addr, sni, ca_pem, h2, request, delivered))
}

/// Run a test client's work on a runtime of its own, giving up after a minute.
fn block_on_client<T>(
    work: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .map_err(|_| "timed out".to_string())?
    })
}

async fn send_async(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    h2: bool,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
    delivered: Option<Arc<std::sync::atomic::AtomicUsize>>,
) -> Result<ClientResponse, String> {
    use hyper_util::rt::TokioExecutor;
    let io = connect_tls(addr, sni, ca_pem, h2).await?;
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("h1: {e}"))?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?
    };
    read_response(response, delivered).await
}

/// TCP to `addr`, then TLS with SNI `sni` trusting `ca_pem`, offering h2 or http/1.1.
async fn connect_tls(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &[u8],
    h2: bool,
) -> Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, String>
{
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tcp = connect_as_shim(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name =
        rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(client_tls(ca_pem, alpn))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    Ok(hyper_util::rt::TokioIo::new(tls))
}

async fn read_response(
    response: http::Response<hyper::body::Incoming>,
    delivered: Option<Arc<std::sync::atomic::AtomicUsize>>,
) -> Result<ClientResponse, String> {
    use http_body_util::BodyExt as _;
    let head_at = Instant::now();
    let status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut chunk_times = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
            chunk_times.push((head_at.elapsed(), data.len()));
            bytes.extend_from_slice(data);
            if let Some(delivered) = &delivered {
                delivered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    Ok(ClientResponse {
        status,
        version,
        headers,
        body: bytes,
        chunk_times,
    })
}

/// A GET request for `https://{host}{path}` with extra headers.
pub fn get(
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut builder = http::Request::builder()
        .method("GET")
        .uri(format!("https://{host}{path}"));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request")
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Does the memory of process `pid` hold `needle`? Reads every readable private mapping
/// through `/proc/<pid>/mem`, as an attacker running as the same user could. `None` when the
/// memory cannot be read (needs the test to be the process's ancestor, or root).
pub fn memory_contains(pid: u32, needle: &str) -> Option<bool> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut readable = false;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("");
        // Every readable mapping but the kernel's own pages ([vvar], [vdso], [vsyscall]).
        if !perms.starts_with('r') || name.starts_with("[v") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        readable = true;
        if contains(&region, needle) {
            return Some(true);
        }
    }
    readable.then_some(false)
}

/// The uid (and gid) that plays the agent's user in tests of the same-uid attacker. CI runs
/// as root, and root reads everything: the attacker must be an ordinary uid, and so must the
/// broker it attacks (the same user). Numeric, so no account is needed.
pub const AGENT_UID: u32 = 4242;

/// Is this test process root?
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The `broker` binary as [`AGENT_UID`] can run it: the build's own when every directory above
/// it lets others through, else a copy (with `libbroker.so` beside it) in a directory that does
/// (a checkout under a private home, as CI's may be).
pub fn broker_bin_for_agent_user() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt as _;
        let built = broker_bin();
        let open_to_others = built.ancestors().skip(1).all(|dir| {
            dir.metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
        });
        if !is_root() || open_to_others {
            return built;
        }
        let dir = std::env::temp_dir().join(format!("broker-agent-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for file in [built.clone(), shim_lib()] {
            let to = dir.join(file.file_name().expect("name"));
            std::fs::copy(&file, &to).expect("copy the binary");
        }
        dir.join("broker")
    })
    .clone()
}

/// `cmd` as [`AGENT_UID`] when the tests run as root (`setpriv`), else as it is (the tests'
/// own user is then the ordinary uid). Set stdio after wrapping. A `broker` command runs the
/// binary [`broker_bin_for_agent_user`] names.
pub fn as_agent_user(cmd: &Command) -> Command {
    let program = if Path::new(cmd.get_program()) == broker_bin() {
        broker_bin_for_agent_user().into_os_string()
    } else {
        cmd.get_program().to_os_string()
    };
    if !is_root() {
        let mut same = Command::new(&program);
        copy_command(cmd, &mut same);
        return same;
    }
    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg(format!("--reuid={AGENT_UID}"))
        .arg(format!("--regid={AGENT_UID}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(&program);
    copy_command(cmd, &mut wrapped);
    // Root's runtime directory is not the agent user's.
    wrapped.env_remove("XDG_RUNTIME_DIR");
    wrapped
}

fn copy_command(from: &Command, to: &mut Command) {
    to.args(from.get_args());
    for (var, value) in from.get_envs() {
        match value {
            Some(value) => to.env(var, value),
            None => to.env_remove(var),
        };
    }
    if let Some(dir) = from.get_current_dir() {
        to.current_dir(dir);
    }
}

/// Give `path` (recursively) to [`AGENT_UID`] when the tests run as root.
pub fn give_to_agent_user(path: &Path) {
    if !is_root() {
        return;
    }
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{AGENT_UID}:{AGENT_UID}"))
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", path.display());
}

/// SHA-256 in hex, by `sha256sum` (what anyone without the key has).
pub fn sha256(s: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// A format-1 line, as brokers before the keyed audit wrote them.
pub fn v1_audit_line(seq: u64, prev: &str, provider: &str) -> String {
    let body = format!(
        "{{\"seq\":{seq},\"time\":\"2025-01-31T12:00:0{seq}.000Z\",\"event\":\"credential_added\",\
         \"provider\":\"{provider}\",\"profile\":\"default\",\"pid\":42,\"command\":\"broker add\",\"prev\":\"{prev}\"}}"
    );
    let hash = sha256(&body);
    format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1])
}

/// Where `scripts/test` installs the agent CLIs (`target/clients`, or
/// `$BROKER_TEST_AGENT_CLIENTS`), or `Err` with the reason they are not there (a registry
/// was unreachable), for the test to skip on.
pub fn agent_clients() -> Result<PathBuf, String> {
    let dir = std::env::var_os("BROKER_TEST_AGENT_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().parent().expect("target").join("clients"));
    // scripts/test writes this file, with its reason, when a registry was unreachable.
    if let Ok(reason) = std::fs::read_to_string(dir.join("agents-skipped")) {
        return Err(reason.trim().to_string());
    }
    Ok(dir)
}

/// A test that cannot run on this machine says why and passes, except where
/// `BROKER_TEST_REQUIRE_ALL` is set: `.ci/run` sets it, because CI installs everything the
/// tests use, so a skip there is a missing install step hiding behind a green run.
pub fn skip(reason: &str) {
    if std::env::var_os("BROKER_TEST_REQUIRE_ALL").is_some() {
        panic!("this test cannot run here: {reason} (BROKER_TEST_REQUIRE_ALL is set, as in CI, which installs what every test needs)");
    }
    eprintln!("skipped: {reason}");
}
