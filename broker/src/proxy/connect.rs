//! The CONNECT listener: the fallback for programs the shim cannot reach (static binaries,
//! Go, musl). `broker run` gives them `HTTPS_PROXY=http://broker:<ticket>@127.0.0.1:<port>` and a CA bundle
//! that includes the run CA.
//!
//! `CONNECT host:port` to a managed host: the broker answers 200 and terminates TLS itself,
//! as on the run's fake address, and the SNI must be the CONNECT host. To any other host:
//! a byte-for-byte tunnel, never decrypted (through the upstream proxy when the broker has one),
//! or a refusal when the run denies unlisted hosts.
//! Anything but CONNECT is refused: plain `http://` through the broker would expose requests.
//! Every request must carry the run's ticket as the password of `Proxy-Authorization: Basic`
//! (`HTTPS_PROXY=http://broker:<ticket>@127.0.0.1:<port>`), else 407 and a `ticket_refused`
//! audit event: the listener's address alone does not say which run a caller belongs to.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use super::error::BrokerError;
use super::limits::{self, Gauge, Slot, HANDSHAKE_TIMEOUT, REFUSAL_TIMEOUT};
use super::listen::{check_peer, count_uid, refuse, terminate_tls, PeerVerdict};
use super::{Proxy, ProxyBody, RunContext, UpstreamProxy};
use crate::audit::{AuditEvent, EventKind};

pub(super) async fn accept_loop(
    proxy: Arc<Proxy>,
    run: Arc<RunContext>,
    gauge: Arc<Gauge>,
    listener: TcpListener,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let mut slot = match proxy.caps.admit(&gauge) {
            Ok(slot) => slot,
            Err(full) => {
                refuse_over_cap(&proxy, &run, peer, stream, full);
                continue;
            }
        };
        let (proxy, run) = (proxy.clone(), run.clone());
        tokio::spawn(async move {
            let Ok(local) = stream.local_addr() else {
                return;
            };
            let peer_id = match check_peer(&proxy, &run, local, peer) {
                PeerVerdict::Admit(peer_id) => peer_id,
                PeerVerdict::Drop => return,
                PeerVerdict::Refuse(error) => {
                    let refusal = serve_http1(stream, move |_req| error.clone().into_response());
                    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refusal).await;
                    return;
                }
            };
            if let Err(full) = count_uid(&proxy, &mut slot, &peer_id) {
                drop(slot);
                refuse_over_cap(&proxy, &run, peer, stream, full);
                return;
            }
            let slot = Arc::new(slot);
            let _ = stream.set_nodelay(true);
            let head_timeout = proxy.caps.limits.request_head_timeout;
            let service = service_fn(move |req| {
                let (proxy, run, slot) = (proxy.clone(), run.clone(), slot.clone());
                let peer = (peer, peer_id.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(proxy, run, req, peer, slot)) }
            });
            // The head timer (see `limits`): a client that connects and sends nothing, or half
            // a CONNECT, is closed like one on the fake address.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// A connection over a cap: audited once per burst (`listen::refuse`), answered with a 503
/// that says which cap while refusal permits last.
fn refuse_over_cap(
    proxy: &Arc<Proxy>,
    run: &Arc<RunContext>,
    peer: SocketAddr,
    stream: TcpStream,
    full: limits::Full,
) {
    refuse(proxy, run, peer, full, |_, _, permit| {
        let error = BrokerError::TooManyConnections {
            message: full.message(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            let refusal = serve_http1(stream, move |_req| error.clone().into_response());
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refusal).await;
        });
    });
}

/// Answer every request on a plain connection with `answer`, then close.
async fn serve_http1(
    stream: TcpStream,
    answer: impl Fn(Request<Incoming>) -> Response<ProxyBody> + Send + Sync + 'static,
) {
    let answer = Arc::new(answer);
    let service = service_fn(move |req| {
        let answer = answer.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(req)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn handle(
    proxy: Arc<Proxy>,
    run: Arc<RunContext>,
    mut req: Request<Incoming>,
    (peer, peer_id): (SocketAddr, super::PeerId),
    slot: Arc<Slot>,
) -> Response<ProxyBody> {
    // The ticket first: without it nothing is proxied, not even an unmanaged tunnel, since
    // the run's `--deny-unlisted` and its policy are what a caller would borrow.
    if let Err(refusal) = super::ticket::check_proxy_authorization(
        req.headers().get(http::header::PROXY_AUTHORIZATION),
        &run.ticket,
    ) {
        let host = req.uri().host().map(str::to_ascii_lowercase);
        super::ticket::record(&proxy, &run, peer, host.as_deref(), refusal);
        return proxy_auth_required();
    }
    if req.method() != Method::CONNECT {
        return BrokerError::BadRequest {
            reason:
                "the broker's proxy only accepts CONNECT (https://); plain http:// is not proxied"
                    .into(),
        }
        .into_response();
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return BrokerError::BadRequest {
            reason: "CONNECT needs host:port".into(),
        }
        .into_response();
    };
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(443);
    // The run's own names, as on its fake address: a host the catalog knows but this run
    // does not manage (AWS in a run without an AWS credential) is tunnelled like any other.
    let managed = run.manages(&host);
    if !managed && run.deny_unlisted {
        proxy.audit.record(AuditEvent {
            run_id: Some(run.id.clone()),
            pid: run.pid.get(),
            command: Some(run.command.clone()),
            host: Some(host.clone()),
            reason: Some("destination not in the run's providers (--deny-unlisted)".into()),
            ..AuditEvent::new(EventKind::Denial)
        });
        return BrokerError::Unlisted { host }.into_response();
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let io = TokioIo::new(upgraded);
        if managed {
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            terminate_tls(proxy, run, io, Some(host), (peer, peer_id), slot, deadline).await;
        } else {
            // The tunnel keeps the connection's place under the caps while it lasts.
            let _slot = slot;
            // Through the proxy only when the agent's environment names it too (see
            // `UpstreamProxy::lent_to_agents`): a proxy and its login from config.toml, or a
            // system broker's, are not the agent's to use.
            let via = proxy
                .upstream_proxy
                .clone()
                .filter(|p| p.lent_to_agents() && !p.bypasses(&host));
            tunnel(io, &host, port, via.as_deref()).await;
        }
    });
    let mut ok = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *ok.status_mut() = StatusCode::OK;
    ok
}

/// 407 for a request without the run's ticket. `Proxy-Authenticate` names Basic, so a client
/// given the proxy URL with its userinfo (`http://broker:<ticket>@...`) knows what to send.
fn proxy_auth_required() -> Response<ProxyBody> {
    let message = "this is another run's proxy, or the request lacks the run's ticket: use the \
                   HTTPS_PROXY that broker run set, with its user and password";
    let mut response = Response::new(
        Full::new(Bytes::from(format!("broker: {message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::PROXY_AUTHENTICATION_REQUIRED;
    let headers = response.headers_mut();
    headers.insert(
        http::header::PROXY_AUTHENTICATE,
        http::HeaderValue::from_static("Basic realm=\"broker\""),
    );
    headers.insert("x-broker-error", http::HeaderValue::from_static(message));
    headers.insert(
        "x-broker-error-source",
        http::HeaderValue::from_static("agent"),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Unmanaged destinations are never decrypted: bytes in, bytes out. Through the upstream
/// proxy when the network has one (`via`: none for a host in its `NO_PROXY`): a program on
/// the CONNECT fallback lost its own `HTTPS_PROXY` to the broker's, so the broker takes its
/// place, as the proxy the user set would have.
async fn tunnel(
    mut client: TokioIo<hyper::upgrade::Upgraded>,
    host: &str,
    port: u16,
    via: Option<&UpstreamProxy>,
) {
    // Bounded, through the proxy or not: a destination or proxy that never answers holds no
    // connection, nor its place under the caps, for longer.
    let limit = super::upstream::CONNECT_TIMEOUT;
    let connect = async {
        match via {
            Some(proxy) => proxy.tunnel(host, port).await.map_err(|e| e.to_string()),
            None => TcpStream::connect((host, port))
                .await
                .map_err(|e| format!("cannot connect: {e}")),
        }
    };
    let upstream = tokio::time::timeout(limit, connect)
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {} s", limit.as_secs())));
    let mut upstream = match upstream {
        Ok(upstream) => upstream,
        Err(reason) => {
            // The client sees the tunnel close; the reason (never a proxy password) is here.
            tracing::info!(%host, port, %reason, "unmanaged tunnel failed");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
