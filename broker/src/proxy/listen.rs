//! Accept: the run's listeners, TLS termination for managed hosts only, and HTTP serving.
//!
//! A run listens on one fake address, `127.77.<slot>.1:<port>`, where every managed name of
//! the run resolves, on `[::1]:<port6>` for IPv6-only sockets, and on its CONNECT listener
//! (`connect`): three listeners whatever the catalog's size. The TLS server name (SNI) tells
//! which host a connection is for; it must be one of the run's managed patterns, else the
//! handshake fails without a certificate (unmanaged hosts are never decrypted), and the
//! `Host` must then equal it (`handler`).
//!
//! Why SNI alone is enough. When each host had an address of its own (and each run one
//! listener per pattern, 254 at most), the address a connection arrived on named its host
//! and the SNI had to agree. That check bound nothing an agent could not undo: every managed
//! name resolves inside the run, so a process that wanted the leaf and route of host B
//! connected to B's address (or to `[::1]`, which never had an address to check) with SNI B.
//! With the SNI alone it reaches only what it could resolve and reach anyway, under the same
//! ticket, run policy and `Host` = SNI check, and a key still goes only to its own provider's
//! hosts. An honest client sends the SNI of the name it resolved, so it gets the host it
//! asked for. The CONNECT listener keeps its check that the SNI is the CONNECT target, which
//! costs nothing there.
//!
//! One address for many hosts is where HTTP/2 clients may reuse a connection for another host
//! (RFC 9113, 9.1.1), but only when its certificate covers that host too: each leaf names one
//! host, and a request that still arrives for another host gets 421 (`Host` must be the
//! SNI), which clients answer with a connection of its own.
//!
//! Which run a connection belongs to is proven by the run's ticket, which the shim sends
//! before the agent's first byte (see `ticket`); the listener it arrived on only says which
//! run it claims.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;

use broker_contract::{host_matches, run_ipv4};

use super::error::BrokerError;
use super::limits::{self, Full, Gauge, Slot, HANDSHAKE_TIMEOUT, REFUSAL_TIMEOUT};
use super::{ConnInfo, PeerId, Proxy, RunContext};
use crate::audit::{AuditEvent, EventKind};
use crate::ca::LocalCa;
use crate::system::access::AccessPolicy;

/// The open listeners of a run. Dropping it stops accepting (open connections finish).
pub struct RunListeners {
    pub port: u16,
    /// 0 when the machine has no IPv6 loopback.
    pub port6: u16,
    /// The CONNECT listener on 127.0.0.1, for programs the shim cannot reach.
    pub connect_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl RunListeners {
    /// Stop accepting new connections.
    pub fn close(mut self) {
        self.tasks.abort_all();
    }
}

/// TLS server config: leaves minted by the CA per SNI, ALPN h2 and http/1.1, and the cipher
/// suite chosen by the broker's order ([`agent_leg_rank`]), not the client's.
pub(super) fn server_config(ca: Arc<LocalCa>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = agent_leg_provider(cpu_has_aes());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(LeafResolver(ca)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// ring's provider with its cipher suites in the agent leg's order ([`agent_leg_rank`]).
fn agent_leg_provider(aes_in_hardware: bool) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| agent_leg_rank(suite.suite(), aes_in_hardware));
    provider
}

/// Where a cipher suite comes in the agent leg's order: the cheapest first. OpenSSL's clients
/// (curl, Python, Node, h2load) list AES-256-GCM with SHA-384 first, and SHA-384 has no CPU
/// instructions on x86 (its SHA extensions cover SHA-256 only): ring's portable SHA-512 was
/// about 6 % of the broker's CPU per new agent connection (README, "Ninth round"). AES-128-GCM
/// with SHA-256 is the suite every TLS 1.3 client must support, at 128-bit strength; the leg
/// never leaves the machine. On a CPU without AES instructions, ring's AES is slow and
/// ChaCha20-Poly1305 comes first. Suites this does not name keep rustls's order after these.
fn agent_leg_rank(suite: rustls::CipherSuite, aes_in_hardware: bool) -> u8 {
    use rustls::CipherSuite as S;
    let (aes128, aes256, chacha) = match aes_in_hardware {
        true => (0, 1, 2),
        false => (1, 2, 0),
    };
    match suite {
        S::TLS13_AES_128_GCM_SHA256 => aes128,
        S::TLS13_AES_256_GCM_SHA384 => aes256,
        S::TLS13_CHACHA20_POLY1305_SHA256 => chacha,
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            3 + aes128
        }
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            3 + aes256
        }
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 3 + chacha,
        _ => 6,
    }
}

/// Whether this CPU has AES instructions (and the carry-less multiply GCM needs).
fn cpu_has_aes() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[derive(Debug)]
struct LeafResolver(Arc<LocalCa>);

impl rustls::server::ResolvesServerCert for LeafResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // No SNI or an unmanaged name: no certificate, so the handshake fails. Unmanaged
        // hosts are never decrypted.
        let name = hello.server_name()?;
        match self.0.leaf_for(name) {
            Ok(leaf) => Some(leaf),
            Err(err) => {
                tracing::debug!(%err, "no certificate for this name");
                None
            }
        }
    }
}

pub(super) async fn open_run(proxy: Arc<Proxy>, run: Arc<RunContext>) -> io::Result<RunListeners> {
    let listener = bind(SocketAddr::new(IpAddr::V4(run_ipv4(run.slot)), 0))?;
    let port = listener.local_addr()?.port();
    // One count for all of the run's listeners, the CONNECT one included; in a run several
    // uids share, each uid's own share counts instead (`admit_uid`, once the uid is known).
    let gauge = if shared_by_uids(&proxy, &run) {
        proxy.caps.shared_run_gauge()
    } else {
        proxy.caps.run_gauge()
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(accept_loop(
        proxy.clone(),
        run.clone(),
        gauge.clone(),
        listener,
    ));
    // IPv6-only sockets cannot reach 127.77.x.x; they get [::1], classified the same way.
    let port6 = match bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)) {
        Ok(listener) => {
            let port6 = listener.local_addr()?.port();
            tasks.spawn(accept_loop(
                proxy.clone(),
                run.clone(),
                gauge.clone(),
                listener,
            ));
            port6
        }
        Err(err) => {
            tracing::debug!(%err, "no IPv6 loopback listener");
            0
        }
    };
    let connect = bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
    let connect_addr = connect.local_addr()?;
    tasks.spawn(super::connect::accept_loop(
        proxy.clone(),
        run.clone(),
        gauge,
        connect,
    ));
    Ok(RunListeners {
        port,
        port6,
        connect_addr,
        tasks,
    })
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    proxy: Arc<Proxy>,
    run: Arc<RunContext>,
    gauge: Arc<Gauge>,
    listener: TcpListener,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match proxy.caps.admit(&gauge) {
                Ok(slot) => {
                    tokio::spawn(serve_connection(
                        proxy.clone(),
                        run.clone(),
                        stream,
                        peer,
                        slot,
                    ));
                }
                Err(full) => refuse_over_cap(&proxy, &run, peer, stream, full),
            },
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A connection over a cap on the run's TLS listeners: audited once per burst (`refuse`), and
/// told so in TLS while refusal permits last.
fn refuse_over_cap(
    proxy: &Arc<Proxy>,
    run: &Arc<RunContext>,
    peer: SocketAddr,
    stream: TcpStream,
    full: Full,
) {
    refuse(proxy, run, peer, full, |proxy, run, permit| {
        tokio::spawn(async move {
            let _permit = permit;
            let error = BrokerError::TooManyConnections {
                message: full.message(),
            };
            let deadline = Instant::now() + REFUSAL_TIMEOUT;
            let _ = timeout_at(deadline, refuse_tls(proxy, run, stream, deadline, error)).await;
        });
    });
}

/// A connection over a cap: audited once per burst, and told why (by `tell`, given a permit)
/// unless too many are being told already, in which case it is just closed.
pub(super) fn refuse(
    proxy: &Arc<Proxy>,
    run: &Arc<RunContext>,
    peer: SocketAddr,
    full: Full,
    tell: impl FnOnce(Arc<Proxy>, Arc<RunContext>, tokio::sync::OwnedSemaphorePermit),
) {
    if full.audit {
        let reason = format!(
            "connection from {peer} refused: {} (audited once per burst of refusals)",
            full.message()
        );
        tracing::warn!(run = %run.id, "{reason}");
        proxy.audit.record(AuditEvent {
            run_id: Some(run.id.clone()),
            pid: run.pid.get(),
            command: Some(run.command.clone()),
            reason: Some(reason),
            uid: match full.scope {
                limits::Scope::Uid(uid) => Some(uid),
                _ => None,
            },
            ..AuditEvent::new(EventKind::ConnectionLimit)
        });
    }
    if let Some(permit) = proxy.caps.refusal_permit() {
        tell(proxy.clone(), run.clone(), permit);
    }
}

/// Tell a connection over the cap why it is refused, in the only words its client reads: TLS
/// with the leaf for its SNI, then `error` to every request, then close. Only for the run's
/// own processes (the ticket first, as for any connection).
async fn refuse_tls(
    proxy: Arc<Proxy>,
    run: Arc<RunContext>,
    mut stream: TcpStream,
    deadline: Instant,
    error: BrokerError,
) {
    let wait = deadline.saturating_duration_since(Instant::now());
    if super::ticket::read_preamble(&mut stream, &run.ticket, wait)
        .await
        .is_err()
    {
        return;
    }
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let Ok(start) = acceptor.await else { return };
    let Ok(tls) = start.into_stream(proxy.tls_server.clone()).await else {
        return;
    };
    let service = service_fn(move |_req| {
        let error = error.clone();
        async move { Ok::<_, std::convert::Infallible>(error.into_response()) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(false);
    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    run: Arc<RunContext>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
) {
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(_) => return,
    };
    let mut slot = slot;
    let peer_id = match check_peer(&proxy, &run, local, peer) {
        PeerVerdict::Admit(peer_id) => peer_id,
        PeerVerdict::Drop => return,
        PeerVerdict::Refuse(error) => {
            // Told in TLS, like a connection over the caps: a few at a time, briefly.
            if let Some(_permit) = proxy.caps.refusal_permit() {
                let deadline = Instant::now() + REFUSAL_TIMEOUT;
                let _ = timeout_at(deadline, refuse_tls(proxy, run, stream, deadline, error)).await;
            }
            return;
        }
    };
    if let Err(full) = count_uid(&proxy, &mut slot, &peer_id) {
        drop(slot);
        refuse_over_cap(&proxy, &run, peer, stream, full);
        return;
    }
    // One deadline for the ticket, the first byte and the TLS handshake.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // The run's ticket comes first, before anything of the connection is looked at: a
    // process that is not of this run is not even told whether it spoke TLS.
    let mut stream = stream;
    if let Err(refusal) =
        super::ticket::read_preamble(&mut stream, &run.ticket, HANDSHAKE_TIMEOUT).await
    {
        super::ticket::record(&proxy, &run, peer, None, refusal);
        return;
    }
    let mut first = [0u8; 1];
    match timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    if first[0] != 0x16 {
        // Not a TLS handshake: plain http:// to a managed host. The placeholder would have
        // crossed in cleartext and the answer would be cleartext too: refuse, clearly.
        serve_plain_refusal(stream, run).await;
        return;
    }

    terminate_tls(
        proxy,
        run,
        stream,
        None,
        (peer, peer_id),
        Arc::new(slot),
        deadline,
    )
    .await;
}

/// TLS for a managed host, then HTTP. The SNI must be a host the run manages; `expected`,
/// from a CONNECT, is the host the connection was made for, and the SNI must be that host.
/// The handshake must be done by `deadline`; `slot` is the connection's place under the caps.
pub(super) async fn terminate_tls<IO>(
    proxy: Arc<Proxy>,
    run: Arc<RunContext>,
    stream: IO,
    expected: Option<String>,
    (peer, peer_id): (SocketAddr, PeerId),
    slot: Arc<Slot>,
    deadline: Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let Ok(Ok(start)) = timeout_at(deadline, acceptor).await else {
        return;
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(|s| s.to_ascii_lowercase());
    let Some(sni) = sni else {
        // No certificate without a name (a client that connected by address): nothing to
        // classify, and nothing is decrypted.
        tracing::debug!(%peer, "TLS without SNI refused");
        return;
    };
    let refused = match expected.as_deref() {
        Some(target) if !host_matches(target, &sni) => {
            Some("TLS server name does not match the host the connection was made for")
        }
        Some(_) => None,
        None if !run.manages(&sni) => {
            Some("TLS server name is not a host this run manages: no certificate, not decrypted")
        }
        None => None,
    };
    if let Some(reason) = refused {
        proxy.audit.record(AuditEvent {
            run_id: Some(run.id.clone()),
            pid: run.pid.get(),
            command: Some(run.command.clone()),
            host: expected,
            sni: Some(sni),
            reason: Some(reason.into()),
            ..AuditEvent::new(EventKind::SniHostMismatch)
        });
        return;
    }
    let Ok(Ok(tls)) = timeout_at(deadline, start.into_stream(proxy.tls_server.clone())).await
    else {
        return;
    };

    let limits = proxy.caps.limits.clone();
    let route = proxy.catalog.serving(&sni);
    let conn = Arc::new(ConnInfo {
        run,
        route,
        sni,
        peer,
        peer_id,
        _slot: slot,
    });
    let activity = Arc::new(limits::Activity::default());
    let watched = activity.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let conn = conn.clone();
        // An HTTP/2 request stays counted until its response body is done, for the idle
        // timeout; HTTP/1.1 ones are timed by hyper and cost nothing here.
        let in_flight = watched.begin(req.version());
        async move {
            let response = super::handler::handle(proxy, conn, req).await;
            Ok::<_, std::convert::Infallible>(match in_flight {
                None => response,
                Some(in_flight) => response.map(|inner| {
                    http_body_util::BodyExt::boxed(limits::Tracked {
                        inner,
                        _in_flight: in_flight,
                    })
                }),
            })
        }
    });
    let builder = http_builder(&limits);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    let ended =
        limits::serve_until_idle(served, &activity, &limits, |c| c.graceful_shutdown()).await;
    if let Some(Err(err)) = ended {
        tracing::debug!(%err, "client connection ended with an error");
    }
}

/// The HTTP server for agent connections, with the limits of [`super::limits`].
fn http_builder(limits: &limits::Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout);
    builder
        .http2()
        .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(limits::H2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
}

/// Is `run` one that several uids share: a system broker's run for bare preloads (a run a
/// uid's shim opened with keys it handed over belongs to that uid alone)?
fn shared_by_uids(proxy: &Proxy, run: &RunContext) -> bool {
    proxy.access().is_some() && run.owner.is_none()
}

/// On a system broker, count the connection against its uid's own share (limits), in every
/// run: the shared run for bare preloads and the runs a uid's shims opened with handed-over
/// keys alike, or one uid could fill the broker by opening more runs. A broker of one user
/// has the run's count only.
pub(super) fn count_uid(proxy: &Proxy, slot: &mut Slot, peer: &PeerId) -> Result<(), Full> {
    if proxy.access().is_some() {
        slot.count_uid(proxy.caps.admit_uid(peer.uid)?);
    }
    Ok(())
}

/// What to do with a connection, by the uid that owns its other end.
pub(super) enum PeerVerdict {
    /// Serve it, as this uid (under its policy on a system broker).
    Admit(PeerId),
    /// Refuse it, telling the client why where the protocol allows (a system broker's
    /// users: a 403 with `x-broker-error`). Already audited.
    Refuse(BrokerError),
    /// Close it without a word (a broker of one user: other uids learn nothing). Already
    /// audited.
    Drop,
}

/// Who is at the other end of `peer`, and may it be served? A peer that cannot be mapped to
/// a uid is refused too: failing closed is the point.
pub(super) fn check_peer(
    proxy: &Proxy,
    run: &RunContext,
    local: SocketAddr,
    peer: SocketAddr,
) -> PeerVerdict {
    let uid = match super::peer::peer_uid(local, peer) {
        Ok(Some(uid)) => uid,
        found => {
            let reason = match found {
                Err(err) => format!("connection refused: cannot read /proc/net/tcp: {err}"),
                _ => {
                    "connection refused: its owner could not be found in /proc/net/tcp".to_string()
                }
            };
            tracing::warn!(%peer, "{reason}");
            proxy.audit.record(AuditEvent {
                run_id: Some(run.id.clone()),
                reason: Some(reason),
                ..AuditEvent::new(EventKind::Denial)
            });
            return PeerVerdict::Drop;
        }
    };
    let Some(access) = proxy.access() else {
        let ours = rustix::process::geteuid().as_raw();
        if uid == ours {
            return PeerVerdict::Admit(PeerId { uid, policy: None });
        }
        let reason =
            format!("connection from uid {uid} refused: the broker serves only uid {ours}");
        tracing::warn!(%peer, "{reason}");
        proxy.audit.record(AuditEvent {
            run_id: Some(run.id.clone()),
            reason: Some(reason),
            ..AuditEvent::new(EventKind::Denial)
        });
        return PeerVerdict::Drop;
    };
    let refusal = match (access.role(uid), run.owner) {
        (None, _) => AccessPolicy::refusal(uid),
        (Some(_), Some(owner)) if owner != uid => format!(
            "uid {uid} may not use this run of the system broker: it belongs to uid {owner}, whose process handed it keys"
        ),
        (Some(_), _) => {
            return PeerVerdict::Admit(PeerId {
                uid,
                policy: Some(access.policy_for(uid)),
            })
        }
    };
    record_uid_refusal(proxy, access, Some(&run.id), uid, &refusal);
    PeerVerdict::Refuse(BrokerError::UidRefused { message: refusal })
}

/// Audit a refused uid: the first refusal of a burst, with the count since the last line.
pub(crate) fn record_uid_refusal(
    proxy: &Proxy,
    access: &AccessPolicy,
    run_id: Option<&str>,
    uid: u32,
    refusal: &str,
) {
    if let Some(since) = access.audit_refusal(uid) {
        tracing::warn!(uid, "{refusal}");
        let more = match since {
            0 => String::new(),
            n => format!(" ({n} more refusals of this uid since the last line)"),
        };
        proxy.audit.record(AuditEvent {
            run_id: run_id.map(str::to_string),
            uid: Some(uid),
            reason: Some(format!("{refusal}{more}")),
            ..AuditEvent::new(EventKind::UidRefused)
        });
    }
}

/// Answer every request on a plain (non-TLS) connection with a 400 that names the host it
/// asked for when the run manages it (the `Host` header; a plain connection has no SNI),
/// then close.
async fn serve_plain_refusal(stream: TcpStream, run: Arc<RunContext>) {
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let host = super::handler::request_host(&req)
            .filter(|host| run.manages(host))
            .unwrap_or_else(|| "a managed host".into());
        let error = BrokerError::BadRequest {
            reason: format!("plain http:// to {host} is refused by broker; use https://"),
        };
        async move { Ok::<_, std::convert::Infallible>(error.into_response()) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite as S;

    /// A handshake in memory between a rustls client with its default order (AES-256-GCM with
    /// SHA-384 first, as OpenSSL's clients) and the agent leg's server: the suite it ends on.
    fn negotiated(client_suites: Option<&[S]>) -> S {
        let ca = Arc::new(LocalCa::new(&["api.openai.com".into()], "test").expect("ca"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der()).expect("root");
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(wanted) = client_suites {
            provider
                .cipher_suites
                .retain(|s| wanted.contains(&s.suite()));
        }
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("api.openai.com").expect("name");
        let mut client = rustls::Connection::from(
            rustls::ClientConnection::new(Arc::new(client_config), name).expect("client"),
        );
        let mut server = rustls::Connection::from(
            rustls::ServerConnection::new(server_config(ca).expect("server config"))
                .expect("server"),
        );
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            deliver_flight(&mut client, &mut server);
            deliver_flight(&mut server, &mut client);
        }
        assert!(!server.is_handshaking(), "the handshake did not finish");
        server.negotiated_cipher_suite().expect("a suite").suite()
    }

    /// Move everything `from` has to send into `to`, and let `to` process it.
    fn deliver_flight(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).expect("write");
        }
        let mut unread = wire.as_slice();
        while !unread.is_empty() {
            to.read_tls(&mut unread).expect("read");
        }
        to.process_new_packets().expect("handshake");
    }

    #[test]
    fn the_agent_leg_takes_the_cheapest_suite_the_client_offers() {
        let first = match cpu_has_aes() {
            true => S::TLS13_AES_128_GCM_SHA256,
            false => S::TLS13_CHACHA20_POLY1305_SHA256,
        };
        assert_eq!(
            negotiated(None),
            first,
            "the client's AES-256 preference is not followed"
        );
        // A client that offers only one suite still gets it.
        for only in [
            S::TLS13_AES_256_GCM_SHA384,
            S::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            assert_eq!(negotiated(Some(&[only])), only);
        }
    }

    #[test]
    fn the_order_puts_aes_128_first_with_aes_instructions_and_chacha_without() {
        let order = |aes| agent_leg_provider(aes).cipher_suites;
        let with = order(true);
        let names = |suites: &[rustls::SupportedCipherSuite]| {
            suites.iter().map(|s| s.suite()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&with[..3]),
            [
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_AES_256_GCM_SHA384,
                S::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        let without = order(false);
        assert_eq!(without[0].suite(), S::TLS13_CHACHA20_POLY1305_SHA256);
        // TLS 1.2 suites after every TLS 1.3 one, all of them kept.
        assert_eq!(
            with.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        assert!(with[3..].iter().all(|s| s.tls13().is_none()));
    }
}
