//! WebSocket and other HTTP/1.1 upgrades: the swapped upgrade request goes out on a fresh
//! http/1.1 connection, and when the upstream agrees (101) the two streams are spliced.

use std::sync::Arc;

use http::{header, Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::error::BrokerError;
use super::handler::connect_error;
use super::record::Pending;
use super::{BoxError, ConnInfo, Proxy, ProxyBody};

/// WebSocket (or any HTTP/1.1 upgrade): send the swapped upgrade request on a fresh
/// http/1.1 connection, and when the upstream agrees (101), splice the two upgraded streams.
pub(super) async fn bridge_upgrade(
    proxy: &Arc<Proxy>,
    host: &str,
    port: u16,
    mut req: Request<Incoming>,
    pending: Option<Pending>,
    conn: Arc<ConnInfo>,
) -> Result<Response<ProxyBody>, BrokerError> {
    let io = proxy
        .upgrade_connector
        .connect(host, port)
        .await
        .map_err(|e| connect_error(host, &e))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| BrokerError::UpstreamFailed {
                host: host.to_string(),
                reason: e.to_string(),
            })?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let agent_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    // HTTP/1.1 to the upstream wants an origin-form target and a Host header.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| host.to_string());
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|_| BrokerError::BadRequest {
            reason: "bad upgrade target".into(),
        })?;
    if let Ok(value) = authority.parse() {
        parts.headers.insert(header::HOST, value);
    }
    parts.version = http::Version::HTTP_11;
    let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
    let mut response = sender
        .send_request(req)
        .await
        .map_err(|e| BrokerError::UpstreamFailed {
            host: host.to_string(),
            reason: e.to_string(),
        })?;
    let status = response.status().as_u16();
    if let Some(p) = pending {
        proxy
            .audit
            .record(p.event(&conn, status, 0, Some("upgrade".into())));
    }
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(agent), Ok(upstream)) = (agent_upgrade.await, upstream_upgrade.await) {
                let mut agent = TokioIo::new(agent);
                let mut upstream = TokioIo::new(upstream);
                let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
            }
        });
    }
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}
