//! The HTTP client for token, device-authorization and revocation endpoints: hyper-util's
//! legacy client over the proxy's [`UpstreamConnector`] (verified TLS against the system roots,
//! honouring the test-only `--upstream-ca` / `--resolve`), and plain HTTP only to this machine
//! (a local development or test server): a token never crosses a network in the clear.

use std::net::IpAddr;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{form_encode, OAuthError, TokenSet, ENDPOINT_TIMEOUT};
use crate::providers::ClientAuth;
use crate::proxy::upstream::UpstreamConnector;
use crate::proxy::UpstreamSettings;

/// Largest endpoint response read (a token response with a JWT or two fits easily).
const MAX_RESPONSE: usize = 256 * 1024;

/// Check an endpoint URL: https, or http to a loopback host.
pub fn endpoint_uri(url: &str) -> Result<Uri, OAuthError> {
    let bad = |why: &str| OAuthError::Config(format!("OAuth endpoint '{url}' {why}"));
    let uri: Uri = url.parse().map_err(|_| bad("is not a valid URL"))?;
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(bad(
            "must use https (plain http is accepted for this machine only)",
        )),
        _ => Err(bad("must be an https URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How the client authenticates on a request.
pub struct ClientCredentials<'a> {
    pub client_id: &'a str,
    pub auth: ClientAuth,
    pub secret: Option<&'a str>,
}

/// A client for OAuth endpoints. Cheap to build; not pooled (logins and refreshes are rare).
pub struct EndpointClient {
    https: Client<UpstreamConnector, Full<Bytes>>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// Form fields that carry no secret (the rest of a form is a token, code or client secret).
const NOT_SECRET_FIELDS: &[&str] = &[
    "grant_type",
    "token_type_hint",
    "scope",
    "redirect_uri",
    "client_id",
];

/// An OAuth error's text (`error`, `error_description`) ends up in messages and logs: every
/// form of what the request sent (a refresh token, a client secret, a code) is overwritten in
/// it, for a server that quotes it.
fn redact_error_text(json: &mut serde_json::Value, sent: &[&[u8]]) {
    for field in ["error", "error_description"] {
        if let Some(serde_json::Value::String(text)) = json.get_mut(field) {
            *text = crate::proxy::redact_text(text.as_bytes(), sent);
        }
    }
}

/// A JSON answer from an endpoint.
pub struct Answer {
    pub status: u16,
    pub json: serde_json::Value,
}

impl EndpointClient {
    /// `allow_private`: the provider's `private_addresses = true`, which lets its endpoints
    /// resolve to internal addresses (the SSRF guard, `UpstreamConnector::for_token_endpoints`).
    pub fn new(upstream: UpstreamSettings, allow_private: bool) -> EndpointClient {
        let https = Client::builder(TokioExecutor::new()).build(
            UpstreamConnector::for_token_endpoints(upstream, allow_private),
        );
        let http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        EndpointClient { https, http }
    }

    /// POST a form to `url`, authenticating as `client`, and read a JSON answer.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        client: &ClientCredentials<'_>,
    ) -> Result<Answer, OAuthError> {
        let uri = endpoint_uri(url)?;
        let mut pairs: Vec<(&str, &str)> = form.to_vec();
        let mut basic = None;
        match (client.auth, client.secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 2.3.1: both form-encoded before the Basic encoding.
                let raw = Zeroizing::new(format!(
                    "{}:{}",
                    form_encode(client.client_id),
                    form_encode(secret)
                ));
                basic = Some(Zeroizing::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
                )));
            }
            (ClientAuth::Post, Some(secret)) => {
                pairs.push(("client_id", client.client_id));
                pairs.push(("client_secret", secret));
            }
            _ => pairs.push(("client_id", client.client_id)),
        }
        let body = Zeroizing::new(
            pairs
                .iter()
                .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
                .collect::<Vec<_>>()
                .join("&"),
        );
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            // GitHub answers form-encoded unless asked for JSON.
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("broker/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &basic {
            req = req.header(header::AUTHORIZATION, auth.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body.as_bytes().to_vec())))
            .map_err(|e| OAuthError::Config(e.to_string()))?;
        let endpoint_err = |reason: String| OAuthError::Endpoint {
            url: url.to_string(),
            reason,
        };
        let work = async {
            let response = if uri.scheme_str() == Some("https") {
                self.https.request(req).await
            } else {
                self.http.request(req).await
            }
            .map_err(|e| endpoint_err(error_chain(&e)))?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| endpoint_err(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, OAuthError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(ENDPOINT_TIMEOUT, work)
            .await
            .map_err(|_| {
                endpoint_err(format!("no answer within {} s", ENDPOINT_TIMEOUT.as_secs()))
            })??;
        let mut json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(json) => json,
                Err(_) => {
                    return Err(OAuthError::BadResponse {
                        url: url.to_string(),
                        status,
                    })
                }
            }
        };
        let sent: Vec<&[u8]> = pairs
            .iter()
            .filter(|(k, _)| !NOT_SECRET_FIELDS.contains(k))
            .map(|(_, v)| v.as_bytes())
            .chain(client.secret.map(str::as_bytes))
            .collect();
        redact_error_text(&mut json, &sent);
        Ok(Answer { status, json })
    }

    /// POST to a token endpoint and parse tokens, or the OAuth error it answered.
    pub async fn token_request(
        &self,
        token_url: &str,
        form: &[(&str, &str)],
        client: &ClientCredentials<'_>,
    ) -> Result<TokenSet, OAuthError> {
        let answer = self.post_form(token_url, form, client).await?;
        parse_token_answer(token_url, answer)
    }
}

#[derive(Deserialize)]
struct RawTokens {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
}

/// The OAuth error in an answer, if it carries one (RFC 6749 5.2).
pub fn oauth_error(answer: &Answer) -> Option<OAuthError> {
    let error = answer.json.get("error")?.as_str()?.to_string();
    let description = answer
        .json
        .get("error_description")
        .and_then(|d| d.as_str())
        .map(|d| d.chars().take(200).collect());
    Some(OAuthError::Server { error, description })
}

pub fn parse_token_answer(url: &str, answer: Answer) -> Result<TokenSet, OAuthError> {
    if let Some(err) = oauth_error(&answer) {
        return Err(err);
    }
    let bad = || OAuthError::BadResponse {
        url: url.to_string(),
        status: answer.status,
    };
    if answer.status != 200 {
        return Err(bad());
    }
    let raw: RawTokens = serde_json::from_value(answer.json.clone()).map_err(|_| bad())?;
    let access_token = Zeroizing::new(raw.access_token.ok_or_else(bad)?);
    // Some servers send expires_in as a string.
    let expires_in = match raw.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(TokenSet {
        access_token,
        refresh_token: raw
            .refresh_token
            .filter(|r| !r.is_empty())
            .map(Zeroizing::new),
        expires_in,
        scope: raw.scope,
    })
}

/// An error with its causes, for people (hyper's top-level errors say little).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An https endpoint on a loopback address: refused by the guard before any connection,
    /// unless the provider allows private addresses (then the connection is tried, and fails
    /// on the closed port: a different error).
    #[test]
    fn https_endpoints_are_behind_the_ssrf_guard_unless_allowed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let creds = ClientCredentials {
            client_id: "c",
            auth: ClientAuth::Post,
            secret: None,
        };
        let post = |allow_private: bool| {
            let client = EndpointClient::new(UpstreamSettings::default(), allow_private);
            runtime
                .block_on(client.post_form("https://127.0.0.1:1/token", &[], &creds))
                .err()
                .expect("no server there")
                .to_string()
        };
        let guarded = post(false);
        assert!(
            guarded.contains("127.0.0.1 (loopback)") && guarded.contains("SSRF guard"),
            "{guarded}"
        );
        let allowed = post(true);
        assert!(!allowed.contains("SSRF guard"), "{allowed}");
    }

    #[test]
    fn an_error_quoting_what_was_sent_is_redacted() {
        let refresh = "rt-quoted-by-the-server-0123456789";
        let secret = "cs-quoted-by-the-server-0123456789";
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("client:{secret}"));
        let mut json = serde_json::json!({
            "error": "invalid_grant",
            "error_description": format!("refresh token {refresh} unknown for {b64}"),
        });
        redact_error_text(&mut json, &[refresh.as_bytes(), secret.as_bytes()]);
        let answer = Answer { status: 400, json };
        let err = oauth_error(&answer).expect("an error");
        assert!(err.is_grant_rejected(), "the error code stands");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "the authorization server refused: invalid_grant (refresh token [redacted"
            ),
            "{text}"
        );
        assert!(!text.contains(refresh) && !text.contains("0123456789"));
        assert!(
            !text.contains(&b64[12..40]),
            "the secret's base64 is overwritten"
        );
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(endpoint_uri("https://github.com/login/oauth/access_token").is_ok());
        assert!(endpoint_uri("http://127.0.0.1:8080/token").is_ok());
        assert!(endpoint_uri("http://[::1]:8080/token").is_ok());
        assert!(endpoint_uri("http://localhost/token").is_ok());
        assert!(endpoint_uri("http://idp.example/token").is_err());
        assert!(endpoint_uri("http://127.0.0.1.evil.example/token").is_err());
        assert!(endpoint_uri("ftp://idp.example/token").is_err());
    }

    #[test]
    fn token_answers_and_errors() {
        let ok = Answer {
            status: 200,
            json: serde_json::json!({"access_token":"at","expires_in":"60","refresh_token":"rt","token_type":"Bearer"}),
        };
        let t = parse_token_answer("u", ok).expect("tokens");
        assert_eq!(t.access_token.as_str(), "at");
        assert_eq!(t.expires_in, Some(60));
        assert!(!format!("{t:?}").contains("rt\""));
        let err = Answer {
            status: 400,
            json: serde_json::json!({"error":"invalid_grant","error_description":"grant request is invalid"}),
        };
        let e = parse_token_answer("u", err).expect_err("error");
        assert!(e.is_grant_rejected());
        assert!(e.to_string().contains("invalid_grant"));
        let html = Answer {
            status: 502,
            json: serde_json::Value::Null,
        };
        assert!(matches!(
            parse_token_answer("u", html),
            Err(OAuthError::BadResponse { status: 502, .. })
        ));
    }
}
