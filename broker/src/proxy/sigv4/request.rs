//! One request's SigV4 signature: where it is (the `Authorization` header or a presigned
//! URL's query), checking it with the placeholder secret, and putting the real credential's
//! signature in its place. Pure functions over the request head.

use http::header::{HeaderName, AUTHORIZATION, HOST};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Uri};

use super::credential::AwsCredential;
use super::signer::{self, Scope, ALGORITHM};

pub const CONTENT_SHA256: &str = "x-amz-content-sha256";
const TOKEN_HEADER: &str = "x-amz-security-token";
const DATE_HEADER: &str = "x-amz-date";
const Q_ALGORITHM: &str = "X-Amz-Algorithm";
const Q_CREDENTIAL: &str = "X-Amz-Credential";
const Q_DATE: &str = "X-Amz-Date";
const Q_SIGNED_HEADERS: &str = "X-Amz-SignedHeaders";
const Q_SIGNATURE: &str = "X-Amz-Signature";
const Q_TOKEN: &str = "X-Amz-Security-Token";

/// Headers the broker drops or rewrites on the way (hop-by-hop ones): never part of the
/// signature it sends.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Header,
    Query,
}

/// What the agent signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub location: Location,
    pub access_key: String,
    pub scope: Scope,
    pub signed_headers: Vec<String>,
    pub signature: String,
    pub amz_date: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0} is not supported by the broker: sign with AWS4-HMAC-SHA256 (SigV4)")]
    Unsupported(String),
    /// Signed with an access key id that is not the broker's placeholder.
    #[error("the request is signed with an access key id that is not the broker's placeholder: use the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY the run gives (real keys belong in 'broker add aws')")]
    NotPlaceholder { looks_real: bool },
    #[error("the request's SigV4 signature does not verify with the placeholder secret: sign with the AWS_SECRET_ACCESS_KEY the run gives, unchanged")]
    BadSignature,
    #[error("the request carries an x-amz-security-token that is not the broker's placeholder: unset AWS_SESSION_TOKEN in the agent (the broker adds the real one)")]
    ForeignToken,
    #[error("the signed header '{0}' is missing from the request")]
    MissingHeader(String),
}

/// Where the request's SigV4 signature is. `Ok(None)`: the request is not signed (an
/// anonymous request, e.g. to a public S3 object).
pub fn find(headers: &HeaderMap, uri: &Uri) -> Result<Option<Signed>, SignError> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| SignError::Malformed("the Authorization header is not text".into()))?;
        return parse_authorization(text, headers).map(Some);
    }
    let query = uri.query().unwrap_or("");
    match query_param(query, Q_ALGORITHM) {
        None if query_param(query, "AWSAccessKeyId").is_some() => Err(SignError::Unsupported(
            "signature version 2 (AWSAccessKeyId)".into(),
        )),
        None => Ok(None),
        Some(alg) if alg == ALGORITHM => parse_presigned(query).map(Some),
        Some(alg) => Err(SignError::Unsupported(format!("X-Amz-Algorithm {alg}"))),
    }
}

fn parse_authorization(text: &str, headers: &HeaderMap) -> Result<Signed, SignError> {
    let text = text.trim();
    let Some(rest) = text.strip_prefix(ALGORITHM).filter(|r| r.starts_with(' ')) else {
        let scheme = text.split_whitespace().next().unwrap_or("");
        return Err(SignError::Unsupported(format!(
            "the Authorization scheme '{}'",
            scheme.chars().take(32).collect::<String>()
        )));
    };
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').unwrap_or((part.trim(), ""));
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed_headers = Some(v),
            "Signature" => signature = Some(v),
            _ => {}
        }
    }
    let missing =
        |what: &str| SignError::Malformed(format!("the Authorization header has no {what}"));
    let (access_key, scope) = parse_credential(credential.ok_or_else(|| missing("Credential"))?)?;
    let amz_date = headers
        .get(DATE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| SignError::Malformed("a SigV4 request needs an x-amz-date header".into()))?
        .to_string();
    signed(
        Location::Header,
        access_key,
        scope,
        signed_headers.ok_or_else(|| missing("SignedHeaders"))?,
        signature.ok_or_else(|| missing("Signature"))?,
        amz_date,
    )
}

fn parse_presigned(query: &str) -> Result<Signed, SignError> {
    let need = |name: &str| {
        query_param(query, name)
            .ok_or_else(|| SignError::Malformed(format!("the presigned URL has no {name}")))
    };
    let (access_key, scope) = parse_credential(&need(Q_CREDENTIAL)?)?;
    signed(
        Location::Query,
        access_key,
        scope,
        &need(Q_SIGNED_HEADERS)?,
        &need(Q_SIGNATURE)?,
        need(Q_DATE)?,
    )
}

fn signed(
    location: Location,
    access_key: String,
    scope: Scope,
    signed_headers: &str,
    signature: &str,
    amz_date: String,
) -> Result<Signed, SignError> {
    let signed_headers: Vec<String> = signed_headers
        .split(';')
        .filter(|h| !h.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(SignError::Malformed(
            "SigV4 signs the host header; this request does not".into(),
        ));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignError::Malformed(
            "the signature is not 64 hex digits".into(),
        ));
    }
    let date_ok = amz_date.len() == 16
        && amz_date.get(..8) == Some(scope.date.as_str())
        && amz_date.as_bytes()[8] == b'T'
        && amz_date.ends_with('Z');
    if !date_ok {
        return Err(SignError::Malformed(
            "x-amz-date must be YYYYMMDDTHHMMSSZ on the credential scope's date".into(),
        ));
    }
    Ok(Signed {
        location,
        access_key,
        scope,
        signed_headers,
        signature: signature.to_ascii_lowercase(),
        amz_date,
    })
}

/// `AKID/YYYYMMDD/region/service/aws4_request`.
fn parse_credential(text: &str) -> Result<(String, Scope), SignError> {
    let parts: Vec<&str> = text.split('/').collect();
    let bad = || {
        SignError::Malformed(
            "the SigV4 Credential is not key/date/region/service/aws4_request".into(),
        )
    };
    let [key, date, region, service, "aws4_request"] = parts[..] else {
        return Err(bad());
    };
    let label_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let date_ok = date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit());
    if key.is_empty() || !date_ok || !label_ok(region) || !label_ok(service) {
        return Err(bad());
    }
    Ok((
        key.to_string(),
        Scope {
            date: date.into(),
            region: region.into(),
            service: service.into(),
        },
    ))
}

/// The canonical request of `parts` as `sig` describes it.
pub fn canonical_request(
    parts: &Parts,
    sig: &Signed,
    payload_hash: &str,
) -> Result<String, SignError> {
    let mut headers = Vec::with_capacity(sig.signed_headers.len());
    for name in &sig.signed_headers {
        let value = if name == "host" {
            host_value(parts)
        } else {
            let values: Vec<String> = parts
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| signer::canonical_header_value(v.as_bytes()))
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        };
        let value = value.ok_or_else(|| SignError::MissingHeader(name.clone()))?;
        headers.push((name.clone(), value));
    }
    let skip = (sig.location == Location::Query).then_some(Q_SIGNATURE);
    Ok(signer::canonical_request(
        parts.method.as_str(),
        &signer::canonical_uri(parts.uri.path(), &sig.scope.service),
        &signer::canonical_query(parts.uri.query().unwrap_or(""), skip),
        &headers,
        payload_hash,
    ))
}

/// The `host` the agent signed: its Host header, else the authority of its request target.
fn host_value(parts: &Parts) -> Option<String> {
    match parts.headers.get(HOST) {
        Some(v) => Some(signer::canonical_header_value(v.as_bytes())),
        None => parts
            .uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase()),
    }
}

/// Does the request's signature verify with `secret`?
pub fn verify(
    parts: &Parts,
    sig: &Signed,
    secret: &str,
    payload_hash: &str,
) -> Result<(), SignError> {
    let canonical = canonical_request(parts, sig, payload_hash)?;
    let key = signer::signing_key(secret, &sig.scope);
    let expected = signer::signature(
        &key,
        &signer::string_to_sign(&sig.amz_date, &sig.scope, &canonical),
    );
    match signer::same_signature(&expected, &sig.signature) {
        true => Ok(()),
        false => Err(SignError::BadSignature),
    }
}

/// Replace the placeholder credential of a verified request with `real`: the key id, the
/// session token (added, replaced or removed), and the signature. Returns the new signature
/// (the seed of a streaming body's chunk chain).
pub fn resign(
    parts: &mut Parts,
    sig: &Signed,
    placeholder_token: &str,
    real: &AwsCredential,
    payload_hash: &str,
) -> Result<String, SignError> {
    let mut signed_headers: Vec<String> = sig
        .signed_headers
        .iter()
        .filter(|h| !NOT_FORWARDED.contains(&h.as_str()))
        .cloned()
        .collect();
    let credential = format!("{}/{}", real.access_key_id, sig.scope.render());
    match sig.location {
        Location::Header => {
            let agent_token = parts.headers.get(TOKEN_HEADER);
            if agent_token.is_some_and(|t| t.as_bytes() != placeholder_token.as_bytes()) {
                return Err(SignError::ForeignToken);
            }
            let token_name = HeaderName::from_static(TOKEN_HEADER);
            signed_headers.retain(|h| h != TOKEN_HEADER);
            match &real.session_token {
                Some(token) => {
                    parts.headers.insert(token_name, sensitive(token)?);
                    signed_headers.push(TOKEN_HEADER.into());
                    signed_headers.sort();
                }
                None => {
                    parts.headers.remove(token_name);
                }
            }
        }
        Location::Query => {
            let query = parts.uri.query().unwrap_or("");
            if query_param(query, Q_TOKEN).is_some_and(|t| t != placeholder_token) {
                return Err(SignError::ForeignToken);
            }
            let names = signed_headers.join(";");
            let query = set_params(
                query,
                &[
                    (Q_CREDENTIAL, Some(credential.as_str())),
                    (Q_TOKEN, real.session_token.as_deref()),
                    (Q_SIGNED_HEADERS, Some(names.as_str())),
                ],
            );
            parts.uri = with_query(&parts.uri, &query)?;
        }
    }
    let resigned = Signed {
        signed_headers,
        ..sig.clone()
    };
    let canonical = canonical_request(parts, &resigned, payload_hash)?;
    let key = signer::signing_key(&real.secret_access_key, &sig.scope);
    let signature = signer::signature(
        &key,
        &signer::string_to_sign(&sig.amz_date, &sig.scope, &canonical),
    );
    match sig.location {
        Location::Header => {
            let value = zeroize::Zeroizing::new(format!(
                "{ALGORITHM} Credential={credential}, SignedHeaders={}, Signature={signature}",
                resigned.signed_headers.join(";")
            ));
            parts.headers.insert(AUTHORIZATION, sensitive(&value)?);
        }
        Location::Query => {
            let query = set_params(
                parts.uri.query().unwrap_or(""),
                &[(Q_SIGNATURE, Some(signature.as_str()))],
            );
            parts.uri = with_query(&parts.uri, &query)?;
        }
    }
    Ok(signature)
}

fn sensitive(text: &str) -> Result<HeaderValue, SignError> {
    let mut value = HeaderValue::from_str(text).map_err(|_| {
        SignError::Malformed("the stored credential cannot be sent in a header".into())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The first value of a query parameter, decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (signer::percent_decode(k) == name.as_bytes())
            .then(|| String::from_utf8_lossy(&signer::percent_decode(v)).into_owned())
    })
}

/// `query` with each named parameter set to its value (encoded), removed (`None`), or added
/// at the end; the other parameters keep their bytes and order.
fn set_params(query: &str, updates: &[(&str, Option<&str>)]) -> String {
    let mut done = vec![false; updates.len()];
    let mut out: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = signer::percent_decode(k);
        match updates
            .iter()
            .position(|(name, _)| name.as_bytes() == decoded)
        {
            Some(i) => {
                if let (false, Some(value)) = (done[i], updates[i].1) {
                    out.push(format!(
                        "{}={}",
                        updates[i].0,
                        signer::uri_encode(value.as_bytes(), false)
                    ));
                }
                done[i] = true;
            }
            None => out.push(pair.to_string()),
        }
    }
    for (i, (name, value)) in updates.iter().enumerate() {
        if let (false, Some(value)) = (done[i], value) {
            out.push(format!(
                "{name}={}",
                signer::uri_encode(value.as_bytes(), false)
            ));
        }
    }
    out.join("&")
}

fn with_query(uri: &Uri, query: &str) -> Result<Uri, SignError> {
    let mut parts = uri.clone().into_parts();
    let path = uri.path();
    let target = match query.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{query}"),
    };
    parts.path_and_query = Some(
        target
            .parse()
            .map_err(|_| SignError::Malformed("the request target cannot be rebuilt".into()))?,
    );
    Uri::from_parts(parts)
        .map_err(|_| SignError::Malformed("the request target cannot be rebuilt".into()))
}
