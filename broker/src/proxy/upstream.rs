//! The forward leg: connections to the provider's real host, resolved by the broker (never an
//! address the agent chose), over TLS verified against the system roots, pooled by hyper.
//!
//! Two test-only overrides exist, both off by default and logged loudly when on:
//! `--upstream-ca FILE` adds a CA to the roots, `--resolve HOST:PORT:ADDR[:PORT2]` pins where a
//! host is reached. Neither disables verification.
//!
//! The SSRF guard: an address the system resolver returns for a provider host is connected to
//! only if it is a public one (`address_class`); loopback, private, link-local (cloud metadata
//! at 169.254.169.254 included), CGNAT, unique-local (fd00:ec2::254) and the like are refused,
//! unless the provider says `private_addresses = true` or the operator pinned the address with
//! `--resolve`. The address checked is the address connected to: nothing is resolved twice,
//! so a name that answers once public and once private (DNS rebinding) gains nothing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::upstream_proxy::UpstreamProxy;

/// How long connecting (TCP + TLS) to an upstream may take before the agent gets a 502.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how the broker reaches upstreams.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSettings {
    /// Test only: one more CA to trust for upstreams (`--upstream-ca`, `BROKER_UPSTREAM_CA`).
    pub extra_ca: Option<PathBuf>,
    /// Test only: fixed addresses for hosts (`--resolve`, `BROKER_RESOLVE`).
    pub resolve: Vec<ResolveOverride>,
    /// Test only: the nameservers the runs' DNS responders forward to, instead of
    /// `/etc/resolv.conf`'s (`--dns-upstream`, `BROKER_DNS_UPSTREAM`).
    pub dns: Vec<SocketAddr>,
    /// The proxy upstreams are reached through, if the network needs one
    /// (`upstream_proxy` in config.toml, `HTTPS_PROXY`): see `upstream_proxy`.
    pub proxy: Option<Arc<UpstreamProxy>>,
}

/// `HOST:PORT:ADDR` (like curl's `--resolve`) or `HOST:PORT:ADDR:PORT2` (connect elsewhere).
/// IPv6 addresses go in brackets: `api.openai.com:443:[::1]:8443`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
}

impl FromStr for ResolveOverride {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad --resolve '{s}': expected HOST:PORT:ADDR or HOST:PORT:ADDR:PORT");
        let (host, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, target) = rest.split_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let addr = if let Ok(addr) = target.parse::<SocketAddr>() {
            addr
        } else if let Ok(ip) = target.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            SocketAddr::new(ip, port)
        } else if let Some((ip, port2)) = target.rsplit_once(':') {
            let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
            SocketAddr::new(ip, port2.parse().map_err(|_| bad())?)
        } else {
            return Err(bad());
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ResolveOverride {
            host: host.to_ascii_lowercase(),
            port,
            addr,
        })
    }
}

/// Why an upstream connection failed; turned into a clear `x-broker-error` by the handler.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("{0}")]
    Connect(io::Error),
    #[error("timed out after {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Certificate(String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("cannot load trust roots: {0}")]
    Roots(String),
    #[error("bad upstream URI")]
    BadUri,
    /// Every address the host resolved to is one the guard refuses: which, and why. (The
    /// proxy words its own message around the list; this one is for the OAuth client's.)
    #[error("it resolves to {0}, where the broker does not connect (SSRF guard): for a server on an internal network set private_addresses = true in the provider file, or pin the address with --resolve; nothing was sent")]
    AddressRefused(String),
    /// The upstream proxy could not be reached, refused the credentials or the CONNECT: the
    /// message names the proxy (never its password) and what it said.
    #[error("{0}")]
    Proxy(String),
}

/// The hyper connector for upstreams. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamConnector {
    inner: Arc<Inner>,
}

struct Inner {
    settings: UpstreamSettings,
    /// Host patterns whose provider allows private addresses (`private_addresses = true`).
    private_hosts: Vec<String>,
    /// Whether the SSRF guard applies (off for an OAuth endpoint of a provider that allows
    /// private addresses: see `for_token_endpoints`).
    guard: bool,
    alpn: Vec<Vec<u8>>,
    /// Built on first use: loading the system roots costs milliseconds that `broker run`
    /// should not pay at start.
    tls: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl UpstreamConnector {
    /// A connector offering http/1.1 only. A pool of HTTP/1.1 connections served more requests
    /// per second than one multiplexed h2 connection on the 2-core machines measured
    /// (`scripts/bench`, keep-alive leg: about a quarter more); WebSocket upgrades need
    /// http/1.1 anyway; and the agent still speaks h2 to the broker when it wants to.
    pub fn new(settings: UpstreamSettings, private_hosts: Vec<String>) -> UpstreamConnector {
        UpstreamConnector::build(settings, private_hosts, true)
    }

    /// A connector for OAuth endpoints (token, device authorization, revocation). Their URLs
    /// come from provider definitions and the operator's config, never from an agent, but the
    /// names are still resolved by the system resolver, so the SSRF guard applies as it does to
    /// the provider's API hosts: `allow_private` is the provider's `private_addresses = true`
    /// (an identity server on an internal network), and `--resolve` pins stay explicit.
    pub fn for_token_endpoints(
        settings: UpstreamSettings,
        allow_private: bool,
    ) -> UpstreamConnector {
        UpstreamConnector::build(settings, Vec::new(), !allow_private)
    }

    fn build(settings: UpstreamSettings, private_hosts: Vec<String>, guard: bool) -> Self {
        UpstreamConnector {
            inner: Arc::new(Inner {
                settings,
                private_hosts,
                guard,
                alpn: vec![b"http/1.1".to_vec()],
                tls: OnceLock::new(),
            }),
        }
    }

    fn tls_config(&self) -> Result<Arc<ClientConfig>, ConnectError> {
        self.inner
            .tls
            .get_or_init(|| build_client_config(&self.inner.settings, &self.inner.alpn))
            .clone()
            .map_err(ConnectError::Roots)
    }

    /// Where to connect for `host:port`: an override, else the system resolver.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        if let Some(o) = self
            .inner
            .settings
            .resolve
            .iter()
            .find(|o| o.port == port && o.host.eq_ignore_ascii_case(host))
        {
            // Pinned by the operator: explicit, so the guard does not apply. Only a process
            // outside any run can pin (`cli::UpstreamArgs`), and TLS is still verified: the
            // README ("SSRF guard") says why checking pins would stop no one.
            return Ok(vec![o.addr]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| ConnectError::Resolve(host.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(ConnectError::Resolve(host.to_string()));
        }
        let private_ok = !self.inner.guard
            || self
                .inner
                .private_hosts
                .iter()
                .any(|pattern| broker_contract::host_matches(pattern, host));
        if private_ok {
            return Ok(addrs);
        }
        // Only the public ones; these exact addresses are the ones connected to.
        let public: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| address_class(a.ip()).is_none())
            .collect();
        if public.is_empty() {
            let refused: Vec<String> = addrs
                .iter()
                .map(|a| format!("{} ({})", a.ip(), address_class(a.ip()).unwrap_or("?")))
                .collect();
            return Err(ConnectError::AddressRefused(refused.join(", ")));
        }
        Ok(public)
    }

    /// The proxy to reach `host:port` through: none when there is none, for a host in its
    /// `NO_PROXY`, and for a host the operator pinned with `--resolve` (reached at that address).
    fn proxy_for(&self, host: &str, port: u16) -> Option<&UpstreamProxy> {
        let settings = &self.inner.settings;
        let proxy = settings.proxy.as_deref()?;
        let pinned = settings
            .resolve
            .iter()
            .any(|o| o.port == port && o.host.eq_ignore_ascii_case(host));
        (!pinned && !proxy.bypasses(host)).then_some(proxy)
    }

    /// A TCP connection to `host:port` itself, to an address the guard allows.
    async fn connect_direct(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let addrs = self.resolve(host, port).await?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(ConnectError::Connect(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no address")
        })))
    }

    /// Connect and handshake to `host:port`, through the upstream proxy if there is one. TLS
    /// is the same either way: verified for `host`, end to end.
    pub async fn connect(&self, host: &str, port: u16) -> Result<UpstreamIo, ConnectError> {
        let tls = self.tls_config()?;
        let via = self.proxy_for(host, port);
        let work = async {
            let tcp = match via {
                Some(proxy) => proxy.tunnel(host, port).await?,
                None => self.connect_direct(host, port).await?,
            };
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(host.to_string()).map_err(|_| ConnectError::BadUri)?;
            let stream = TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(classify_tls)?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamIo {
                io: TokioIo::new(stream),
                h2,
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, work)
            .await
            .map_err(|_| match via {
                Some(proxy) => ConnectError::Proxy(format!(
                    "timed out after {}s through the upstream proxy {proxy}",
                    CONNECT_TIMEOUT.as_secs()
                )),
                None => ConnectError::Timeout,
            })?
    }
}

/// What kind of address `ip` is, when it is one the broker does not send requests to
/// unasked; `None` for a public address. IPv4 inside IPv6 (mapped, NAT64, 6to4) is judged as
/// the IPv4 address it carries.
pub fn address_class(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::{IpAddr, Ipv4Addr};
    let v4_class = |v4: Ipv4Addr| -> Option<&'static str> {
        let [a, b, c, d] = v4.octets();
        match (a, b, c, d) {
            (169, 254, 169, 254) => Some("a cloud metadata address"),
            (100, 100, 100, 200) => Some("a cloud metadata address"),
            (0, ..) => Some("'this network'"),
            (127, ..) => Some("loopback"),
            (10, ..) => Some("a private address"),
            (172, 16..=31, ..) => Some("a private address"),
            (192, 168, ..) => Some("a private address"),
            (169, 254, ..) => Some("link-local"),
            (100, 64..=127, ..) => Some("CGNAT shared address space"),
            (192, 0, 0, _) => Some("IETF protocol assignments"),
            (198, 18..=19, ..) => Some("benchmarking address space"),
            (224..=255, ..) => Some("multicast or reserved"),
            _ => None,
        }
    };
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_class(v4);
            }
            if v6.is_loopback() {
                return Some("loopback");
            }
            if v6.is_unspecified() {
                return Some("the unspecified address");
            }
            match s[0] {
                // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address.
                0x64 if s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => v4_class(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                )),
                0x2002 => v4_class(Ipv4Addr::new(
                    (s[1] >> 8) as u8,
                    s[1] as u8,
                    (s[2] >> 8) as u8,
                    s[2] as u8,
                )),
                0xfd00 if s[1] == 0xec2 && s[2..7] == [0, 0, 0, 0, 0] && s[7] == 0x254 => {
                    Some("a cloud metadata address")
                }
                x if x & 0xfe00 == 0xfc00 => Some("a unique-local (private) address"),
                x if x & 0xffc0 == 0xfe80 => Some("link-local"),
                x if x & 0xff00 == 0xff00 => Some("multicast"),
                // IPv4-compatible (deprecated) ::a.b.c.d.
                0 if s[1..6] == [0, 0, 0, 0, 0] => v4_class(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))
                .or(Some("an IPv4-compatible address")),
                _ => None,
            }
        }
    }
}

fn classify_tls(err: io::Error) -> ConnectError {
    let cert_problem = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(reason) => Some(format!("{reason:?}")),
            _ => None,
        });
    match cert_problem {
        Some(reason) => ConnectError::Certificate(reason),
        None => ConnectError::Tls(err),
    }
}

/// The system's trust store, from where distributions keep it. Not from `SSL_CERT_FILE` or
/// `SSL_CERT_DIR` (which `rustls_native_certs::load_native_certs` would honour): a program
/// the agent starts sets those as easily as it sets anything, and a broker that took them
/// could be pointed at a server of the agent's. Another CA for upstreams (a TLS-intercepting
/// corporate proxy) is given with `--upstream-ca`, which is refused inside a run.
fn system_roots() -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let file = broker_contract::SYSTEM_CA_BUNDLES
        .iter()
        .filter_map(|p| p.to_str().ok())
        .map(std::path::Path::new)
        .find(|p| p.is_file());
    let dir = std::path::Path::new("/etc/ssl/certs");
    let dir = (file.is_none() && dir.is_dir()).then_some(dir);
    rustls_native_certs::load_certs_from_paths(file, dir).certs
}

fn build_client_config(
    settings: &UpstreamSettings,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in system_roots() {
        let _ = roots.add(cert);
    }
    if let Some(path) = &settings.extra_ca {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err("no trusted root certificates found (install ca-certificates)".to_string());
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or(ConnectError::BadUri)?.to_string();
            let port = uri.port_u16().unwrap_or(443);
            this.connect(&host, port).await
        })
    }
}

/// A verified TLS connection to an upstream.
pub struct UpstreamIo {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_knows_private_from_public() {
        for (ip, refused) in [
            ("127.0.0.1", true),
            ("127.8.9.10", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("169.254.1.1", true),
            ("100.64.0.1", true),
            ("100.100.100.200", true),
            ("100.128.0.1", false),
            ("0.0.0.0", true),
            ("224.0.0.1", true),
            ("255.255.255.255", true),
            ("8.8.8.8", false),
            ("104.18.7.192", false),
            ("::1", true),
            ("::", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::808:808", false),
            ("2002:7f00:1::", true),
            ("fd00:ec2::254", true),
            ("fd12::1", true),
            ("fe80::1", true),
            ("ff02::1", true),
            ("::127.0.0.1", true),
            ("2606:4700::6810:7c0", false),
        ] {
            let addr: std::net::IpAddr = ip.parse().expect("ip");
            assert_eq!(address_class(addr).is_some(), refused, "{ip}");
        }
        assert_eq!(
            address_class("169.254.169.254".parse().expect("ip")),
            Some("a cloud metadata address")
        );
        assert_eq!(
            address_class("fd00:ec2::254".parse().expect("ip")),
            Some("a cloud metadata address")
        );
    }

    #[test]
    fn resolve_override_forms() {
        let o: ResolveOverride = "api.openai.com:443:127.0.0.1".parse().expect("parse");
        assert_eq!(o.addr, "127.0.0.1:443".parse().expect("addr"));
        let o: ResolveOverride = "API.openai.com:443:127.0.0.1:8443".parse().expect("parse");
        assert_eq!((o.host.as_str(), o.port), ("api.openai.com", 443));
        assert_eq!(o.addr, "127.0.0.1:8443".parse().expect("addr"));
        let o: ResolveOverride = "h:443:[::1]:9".parse().expect("parse");
        assert_eq!(o.addr, "[::1]:9".parse().expect("addr"));
        let o: ResolveOverride = "h:443:[::1]".parse().expect("parse");
        assert_eq!(o.addr, "[::1]:443".parse().expect("addr"));
        assert!("h:x:1.2.3.4".parse::<ResolveOverride>().is_err());
        assert!("h:443".parse::<ResolveOverride>().is_err());
    }
}
