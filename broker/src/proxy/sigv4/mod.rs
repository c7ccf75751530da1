//! The swap for `auth = "aws_sigv4"` providers: a SigV4 request is signed by the agent with
//! placeholder credentials and signed again here with the real ones.
//!
//! The agent holds a placeholder access key id (`AKIA...`, as SDKs expect) and a placeholder
//! secret, and signs as usual. Before the real credential touches the request, the broker
//! checks that the request was signed with the placeholder id **and** that the signature
//! verifies with the placeholder secret: a request signed with any other key id is refused
//! (audited `real_key_from_agent` when the id looks like a real one), and so is one whose
//! signature does not verify. Then the key id, the session token and the signature are
//! replaced, over the same signed headers, date, region and service (the credential scope the
//! agent signed with says where the request goes).
//!
//! The payload hash is kept as the agent sent it:
//! - `UNSIGNED-PAYLOAD` and `STREAMING-UNSIGNED-PAYLOAD-TRAILER` (botocore's S3 uploads over
//!   HTTPS, with a checksum trailer that no signature covers): the body streams through as is;
//! - `STREAMING-AWS4-HMAC-SHA256-PAYLOAD` (and `-TRAILER`, whose trailing headers carry a
//!   signature of their own at the end of the chain): every chunk's signature is checked on
//!   the placeholder chain and replaced by one of the real chain, chunk by chunk (`chunked`);
//! - a SHA-256 of the body (explicit in `x-amz-content-sha256`, or implicit, as every service
//!   but S3 signs): the body is read first, up to [`MAX_HASHED_BODY`], and its hash checked;
//! - `STREAMING-AWS4-ECDSA-*` (SigV4a) is refused with a clear error, as are SigV2 and SigV4a
//!   headers.
//!
//! A request with no signature at all (a public S3 object) goes on as it came, like a request
//! without a placeholder to any other provider.

pub mod assume;
mod chunked;
pub mod credential;
mod request;
mod signer;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use super::error::BrokerError;
use super::handler::{accepted, lookup, origin_form, strip_hop_by_hop, unanswered};
use super::record::{event, Pending};
use super::{decode, BoxError, ConnInfo, Proxy, ProxyBody};
use crate::audit::EventKind;
use crate::providers::{Provider, Route};
use credential::AwsCredential;
use request::{Location, SignError, Signed, CONTENT_SHA256};

/// Largest body held to check a signed SHA-256 payload hash. Services other than S3 send JSON
/// or form bodies far below this; S3 uploads from the SDKs use `UNSIGNED-PAYLOAD` or a
/// streaming form over HTTPS, which are never held. A larger body signed by hash is refused
/// (400) with what to do instead.
pub const MAX_HASHED_BODY: usize = 16 * 1024 * 1024;

const UNSIGNED: &str = "UNSIGNED-PAYLOAD";
const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
const STREAMING_SIGNED: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
const STREAMING_SIGNED_TRAILER: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER";

type Failure = (BrokerError, Option<String>);

/// How the body travels, from the payload hash the agent signed.
enum Payload {
    /// Not covered by the signature: streamed through.
    Unsigned(String),
    /// Chunk signatures chained on the request's: re-signed as it streams.
    StreamingSigned { trailer: bool },
    /// A SHA-256 of the whole body: read, checked, sent from memory.
    Hashed { hash: String, body: bytes::Bytes },
}

/// Forward one request to an AWS host: check the agent's signature, sign again with the
/// stored credential, send, and answer with the key redacted and the use audited.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    proxy: &Arc<Proxy>,
    conn: &Arc<ConnInfo>,
    provider: &Provider,
    route: &Route,
    spec_index: usize,
    port: u16,
    mut parts: Parts,
    body: Incoming,
    method: &Method,
    uri: &Uri,
    started: Instant,
) -> Result<Response<ProxyBody>, Failure> {
    let name = Some(provider.name.clone());
    let fail = |e: BrokerError| (e, name.clone());
    let Some(config) = &provider.aws_sigv4 else {
        return Err(fail(BrokerError::Vault {
            message: format!("provider {} has no [aws_sigv4] table", provider.name),
        }));
    };
    let signed = match request::find(&parts.headers, &parts.uri) {
        Ok(Some(signed)) => signed,
        // Anonymous: nothing to swap, forwarded as it came.
        Ok(None) => {
            let body = body.map_err(BoxError::from).boxed();
            return send(proxy, conn, port, parts, body, None)
                .await
                .map_err(fail);
        }
        Err(e) => {
            return Err(fail(refusal(
                proxy, conn, provider, method, uri, started, e,
            )))
        }
    };
    if signed.access_key != provider.placeholder {
        let looks_real = provider.key_matches(&signed.access_key);
        let e = SignError::NotPlaceholder { looks_real };
        return Err(fail(refusal(
            proxy, conn, provider, method, uri, started, e,
        )));
    }
    if !proxy.audit.writable() {
        return Err(fail(BrokerError::AuditUnwritable));
    }

    // Look up: a credential handed to this run wins over the vault.
    let profile = conn.run.profile_for(&provider.name).to_string();
    let stored = match conn.run.run_keys.0.get(&provider.name) {
        Some(key) => key.clone(),
        None => lookup(proxy, provider, &profile).await.map_err(fail)?.0,
    };
    let stored = AwsCredential::decode(&stored).map_err(|e| {
        fail(BrokerError::Vault {
            message: e.to_string(),
        })
    })?;
    let real = match &stored.role_arn {
        Some(role) => assume::role_credential(proxy, &provider.name, &profile, &stored, role)
            .await
            .map_err(fail)?,
        None => stored.clone(),
    };
    drop(stored);
    accepted(proxy, provider, route, spec_index, &conn.sni)
        .await
        .map_err(fail)?;

    // Check the agent's signature over the request as it came.
    let (payload, body) = payload(&parts, &signed, body).await.map_err(fail)?;
    let payload_hash = match &payload {
        Payload::Unsigned(hash) => hash.clone(),
        Payload::StreamingSigned { trailer: false } => STREAMING_SIGNED.to_string(),
        Payload::StreamingSigned { trailer: true } => STREAMING_SIGNED_TRAILER.to_string(),
        Payload::Hashed { hash, .. } => hash.clone(),
    };
    if let Err(e) = request::verify(&parts, &signed, &config.secret_placeholder, &payload_hash) {
        return Err(fail(refusal(
            proxy, conn, provider, method, uri, started, e,
        )));
    }

    // Swap: what the broker changes on the way is changed before the new signature covers it.
    strip_hop_by_hop(&mut parts.headers, false);
    decode::narrow_accept_encoding(&mut parts.headers);
    let seed = request::resign(
        &mut parts,
        &signed,
        &config.session_token_placeholder,
        &real,
        &payload_hash,
    )
    .map_err(|e| {
        fail(BrokerError::BadRequest {
            reason: e.to_string(),
        })
    })?;
    let body = match payload {
        Payload::Unsigned(_) => body,
        Payload::Hashed { body, .. } => Full::new(body).map_err(|never| match never {}).boxed(),
        Payload::StreamingSigned { trailer } => chunked::resign_body(
            body,
            chunked::Chains {
                amz_date: signed.amz_date.clone(),
                scope: signed.scope.clone(),
                placeholder_key: signer::signing_key(&config.secret_placeholder, &signed.scope),
                placeholder_seed: signed.signature.clone(),
                real_key: signer::signing_key(&real.secret_access_key, &signed.scope),
                real_seed: seed,
                trailer,
            },
        ),
    };
    tracing::debug!(
        service = %signed.scope.service,
        region = %signed.scope.region,
        presigned = signed.location == Location::Query,
        payload = %payload_hash.get(..34).unwrap_or(&payload_hash),
        "SigV4 request checked and signed again"
    );
    let pending = Pending {
        kind: EventKind::CredentialUse,
        provider: provider.name.clone(),
        profile,
        method: method.clone(),
        path: uri.path().to_owned(),
        started,
        secret: zeroize::Zeroizing::new(real.secret_access_key.clone()),
    };
    send(proxy, conn, port, parts, body, Some(pending))
        .await
        .map_err(fail)
}

/// The payload hash the agent signed, and the body to send (read into memory only when its
/// hash must be checked).
async fn payload(
    parts: &Parts,
    signed: &Signed,
    body: Incoming,
) -> Result<(Payload, ProxyBody), BrokerError> {
    let declared = parts
        .headers
        .get(CONTENT_SHA256)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let declared = match (declared, signed.location) {
        (Some(d), _) => Some(d),
        // S3 presigned URLs sign no payload; other services' presigned requests sign the
        // hash of the (usually empty) body.
        (None, Location::Query) if signed.scope.service == "s3" => Some(UNSIGNED.to_string()),
        (None, _) => None,
    };
    let streamed = body.map_err(BoxError::from).boxed();
    match declared.as_deref() {
        Some(UNSIGNED) | Some(STREAMING_UNSIGNED_TRAILER) => {
            Ok((Payload::Unsigned(declared.clone().unwrap_or_default()), streamed))
        }
        Some(STREAMING_SIGNED) => Ok((Payload::StreamingSigned { trailer: false }, streamed)),
        Some(STREAMING_SIGNED_TRAILER) => {
            Ok((Payload::StreamingSigned { trailer: true }, streamed))
        }
        Some(other) if other.starts_with("STREAMING-") => Err(BrokerError::BadRequest {
            reason: format!(
                "the payload signing '{}' is not supported by the broker: use UNSIGNED-PAYLOAD, {STREAMING_SIGNED}, {STREAMING_SIGNED_TRAILER} or {STREAMING_UNSIGNED_TRAILER}",
                other.chars().take(64).collect::<String>()
            ),
        }),
        Some(hash) if !is_sha256_hex(hash) => Err(BrokerError::BadRequest {
            reason: "x-amz-content-sha256 is neither a SHA-256 (64 hex digits) nor a known payload mode".into(),
        }),
        claimed => {
            let bytes = read_bounded(streamed, MAX_HASHED_BODY)
                .await
                .map_err(|e| BrokerError::BadRequest {
                    reason: match e {
                        ReadError::TooLarge => format!(
                            "the body's SHA-256 is signed, so the broker reads the body to check it, up to {} MiB; this one is larger: sign it with UNSIGNED-PAYLOAD or a streaming payload (the SDKs do for S3 uploads over HTTPS)",
                            MAX_HASHED_BODY / (1024 * 1024)
                        ),
                        ReadError::Body(e) => format!("reading the request body failed: {e}"),
                    },
                })?;
            let actual = crate::hex::sha256(&bytes);
            if claimed.is_some_and(|c| !c.eq_ignore_ascii_case(&actual)) {
                return Err(BrokerError::BadRequest {
                    reason: "x-amz-content-sha256 is not the SHA-256 of the body".into(),
                });
            }
            let placeholder = http_body_util::Empty::new().map_err(|never| match never {}).boxed();
            Ok((
                Payload::Hashed {
                    hash: claimed.map_or(actual, str::to_ascii_lowercase),
                    body: bytes,
                },
                placeholder,
            ))
        }
    }
}

pub(super) enum ReadError {
    TooLarge,
    Body(String),
}

/// All of `body`, refused past `max` bytes.
pub(super) async fn read_bounded(
    mut body: ProxyBody,
    max: usize,
) -> Result<bytes::Bytes, ReadError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Body(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(ReadError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A refused request: audited (`real_key_from_agent` for a real-looking key id, a denial
/// otherwise) and turned into the agent's error.
fn refusal(
    proxy: &Proxy,
    conn: &ConnInfo,
    provider: &Provider,
    method: &Method,
    uri: &Uri,
    started: Instant,
    error: SignError,
) -> BrokerError {
    let kind = match error {
        SignError::NotPlaceholder { looks_real: true } => EventKind::RealKeyFromAgent,
        _ => EventKind::Denial,
    };
    let broker_error = match error {
        SignError::Malformed(_) | SignError::Unsupported(_) | SignError::MissingHeader(_) => {
            BrokerError::BadRequest {
                reason: error.to_string(),
            }
        }
        _ => BrokerError::Signature {
            reason: error.to_string(),
        },
    };
    proxy.audit.record(event(
        conn,
        kind,
        Some(provider.name.clone()),
        None,
        method,
        uri,
        broker_error.status().as_u16(),
        0,
        started,
        Some(broker_error.message()),
    ));
    broker_error
}

/// Forward and respond: the tail of the request path, as `handler::forward` has it for
/// other providers (HTTP/1.1 upstream, origin-form, the answer redacted and audited).
async fn send(
    proxy: &Arc<Proxy>,
    conn: &Arc<ConnInfo>,
    port: u16,
    mut parts: Parts,
    body: ProxyBody,
    pending: Option<Pending>,
) -> Result<Response<ProxyBody>, BrokerError> {
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.remove(http::header::HOST);
    origin_form(&mut parts.uri);
    parts.version = http::Version::HTTP_11;
    let req = Request::from_parts(parts, body);
    let response = match proxy.pool.send(&conn.sni, port, req).await {
        Ok(response) => response,
        Err(e) => return Err(unanswered(proxy, conn, pending, e)),
    };
    Ok(super::handler::to_agent(proxy, conn, pending, response))
}
