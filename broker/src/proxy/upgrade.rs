//! WebSocket and other HTTP/1.1 upgrades: the swapped upgrade request goes out on a fresh
//! http/1.1 connection, and when the upstream agrees (101) the two streams are spliced.

use std::sync::Arc;

use http::{header, Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::error::BrokerError;
use super::handler::{redacted_answer, unanswered, upstream_error};
use super::pool::SendError;
use super::record::Pending;
use super::redact::{redact_headers, StreamRedactor};
use super::ws_redact::FrameRedactor;
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
    // Its own connection: once upgraded it is the WebSocket's, never pooled.
    let (mut sender, host_header) = proxy
        .pool
        .connect_unpooled(host, port)
        .await
        .map_err(|e| upstream_error(host, e))?;
    let agent_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    // The target is origin-form already (the handler's doing); HTTP/1.1 wants a Host too.
    parts.headers.insert(header::HOST, host_header);
    // With a credential on it, the WebSocket's frames from the upstream are checked for the
    // key; compressed frames could not be, so no extension (permessage-deflate) is offered.
    let needles = pending
        .as_ref()
        .map(|p| proxy.needles.get(p.secret.as_bytes()));
    let websocket = is_websocket(&parts.headers);
    if needles.is_some() && websocket {
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    parts.version = http::Version::HTTP_11;
    let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
    let mut response = match sender.send_request(req).await {
        Ok(response) => response,
        Err(e) => return Err(unanswered(proxy, &conn, pending, SendError::Http(e))),
    };
    let status = response.status().as_u16();
    if let Some(p) = pending {
        proxy
            .audit
            .record_request(p.into_request_event(&conn, status, 0, Some("upgrade".into())));
    }
    let switched = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    if switched {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        // WebSocket frames are parsed, so a message is never held back past its end; any other
        // protocol is checked as a plain byte stream.
        let redactor = needles.clone().map(|needles| match websocket {
            true => Redactor::Frames(FrameRedactor::new(needles)),
            false => Redactor::Bytes(StreamRedactor::new(needles)),
        });
        // The splice keeps the agent connection's place under the caps while it lasts.
        let held = conn.clone();
        tokio::spawn(async move {
            let _held = held;
            if let (Ok(agent), Ok(upstream)) = (agent_upgrade.await, upstream_upgrade.await) {
                let mut agent = TokioIo::new(agent);
                let mut upstream = TokioIo::new(upstream);
                match redactor {
                    Some(redactor) => splice_redacted(agent, upstream, redactor).await,
                    None => {
                        let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
                    }
                }
            }
        });
    }
    let (mut parts, body) = response.into_parts();
    // The canonical reason phrase only (see the handler's Respond step).
    parts.extensions.clear();
    let mut body = body.map_err(BoxError::from).boxed();
    if let Some(needles) = needles {
        // The answer to a request that carried the key is checked like any other: a refused
        // upgrade's error body may quote it.
        match switched {
            true => redact_headers(&mut parts.headers, &needles),
            false => body = redacted_answer(&mut parts.headers, body, needles, host),
        }
    }
    Ok(Response::from_parts(parts, body))
}

/// What checks the upstream's half of an upgraded connection that carried a credential.
enum Redactor {
    Frames(FrameRedactor),
    Bytes(StreamRedactor),
}

impl Redactor {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        match self {
            Redactor::Frames(r) => r.feed(input, out),
            Redactor::Bytes(r) => r.feed(input, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match self {
            Redactor::Frames(r) => r.finish(out),
            Redactor::Bytes(r) => r.finish(out),
        }
    }
}

fn is_websocket(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Splice agent and upstream, with the key overwritten in what the upstream sends (see
/// [`Redactor`]). Each direction ends by shutting down the other side's writer.
async fn splice_redacted<A, U>(agent: A, upstream: U, mut redactor: Redactor)
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut agent_read, mut agent_write) = tokio::io::split(agent);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let to_upstream = async {
        let _ = tokio::io::copy(&mut agent_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    };
    let to_agent = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::with_capacity(buf.len());
        loop {
            let n = match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            redactor.feed(&buf[..n], &mut out);
            if agent_write.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        redactor.finish(&mut out);
        let _ = agent_write.write_all(&out).await;
        let _ = agent_write.shutdown().await;
    };
    tokio::join!(to_upstream, to_agent);
}
