//! The self-test's stand-in for the providers' APIs: one TLS listener on 127.0.0.1:0 with
//! its own CA and a certificate for each provider host, answering as the fake provider of
//! the request's host ([`super::fake_llm`]) and recording each request (with whether it
//! carried the real key, never the key itself outside `authorization`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::fake_llm::{self, Answer, Provider, ProviderRequest};
use crate::home::write_private_file;

/// The repository the git probe lists; the origin answers its `info/refs` with [`GIT_REF`].
pub const GIT_URL: &str = "https://api.openai.com/broker-self-test.git";
const GIT_REF: &str = "8c7a1e0f4b3d2c1a0f9e8d7c6b5a493827161504\trefs/heads/main\n";

/// One request as the origin received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The host it was for (`Host` or the HTTP/2 authority, without a port).
    pub host: String,
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Whether it asked for a WebSocket.
    pub websocket: bool,
    /// Its `Authorization` header, if any (for `broker demo` to show what arrived).
    pub authorization: Option<String>,
    /// Whether it carried the real key of its host's provider where that provider's clients
    /// put it.
    pub real_key: bool,
}

/// A request with its body, as the fake provider reads it.
struct Received {
    method: String,
    target: String,
    headers: http::HeaderMap,
    body: Bytes,
}

impl ProviderRequest for Received {
    fn method(&self) -> &str {
        &self.method
    }
    fn target(&self) -> &str {
        &self.target
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// The made-up key the origin accepts, per provider.
pub type Keys = Arc<Vec<(Provider, String)>>;

pub struct Origin {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    received: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    pub async fn start(scratch: &Path, keys: Keys) -> anyhow::Result<Origin> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "broker self-test origin CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let leaf_key = KeyPair::generate()?;
        let names: Vec<String> = Provider::ALL.iter().map(|p| p.host().to_string()).collect();
        let leaf = CertificateParams::new(names)?.signed_by(&leaf_key, &ca, &ca_key)?;
        let ca_file = scratch.join("origin-ca.pem");
        write_private_file(&ca_file, ca.pem().as_bytes())?;

        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, keys) = (acceptor.clone(), seen.clone(), keys.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| answer(req, seen.clone(), keys.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Origin {
            addr,
            ca_file,
            received,
        })
    }

    /// Every request so far, in order.
    pub fn received(&self) -> Vec<Seen> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

type Body = Full<Bytes>;

fn respond(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert("content-type", http::HeaderValue::from_static(content_type));
    response
}

async fn answer(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    keys: Keys,
) -> Result<Response<Body>, std::convert::Infallible> {
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let host = parts
        .uri
        .host()
        .or_else(|| parts.headers.get("host").and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default().to_string();
    let request = Received {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        body: body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default(),
        headers: parts.headers,
    };
    let provider = Provider::for_host(&host);
    let key = provider.and_then(|p| keys.iter().find(|(k, _)| *k == p).map(|(_, key)| key));
    let real_key = match (provider, key) {
        (Some(p), Some(key)) => p.has_key(&request, key),
        _ => false,
    };
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
        host: host.clone(),
        method: request.method.clone(),
        target: request.target.clone(),
        websocket: request.header("upgrade").is_some(),
        authorization: request.header("authorization").map(str::to_string),
        real_key,
    });
    let (Some(provider), Some(key)) = (provider, key) else {
        return Ok(respond(404, "text/plain", "not a provider host"));
    };
    // The git probe: a forge-like `info/refs` in git's dumb-HTTP form (a ref list).
    if provider == Provider::OpenAi
        && request
            .target
            .split('?')
            .next()
            .unwrap_or_default()
            .ends_with(".git/info/refs")
        && real_key
    {
        return Ok(respond(200, "text/plain", GIT_REF));
    }
    Ok(match fake_llm::reply(provider, key, &request) {
        Answer::Json(status, body) => respond(status, "application/json", body),
        Answer::Events(events) => {
            let mut response = respond(200, "text/event-stream", events.concat());
            response
                .headers_mut()
                .insert("cache-control", http::HeaderValue::from_static("no-cache"));
            response
        }
        Answer::WebSocketEvents(events) => {
            let accept =
                super::ws::accept_key(request.header("sec-websocket-key").unwrap_or_default());
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let _ = super::ws::serve_events(TokioIo::new(upgraded), events).await;
                }
            });
            let mut response = respond(101, "text/plain", Bytes::new());
            let headers = response.headers_mut();
            headers.remove("content-type");
            headers.insert("connection", http::HeaderValue::from_static("upgrade"));
            headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
            if let Ok(accept) = http::HeaderValue::from_str(&accept) {
                headers.insert("sec-websocket-accept", accept);
            }
            response
        }
    })
}
