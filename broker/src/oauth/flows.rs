//! The grants `broker login` runs. Each ends with tokens from the token endpoint; progress goes
//! to stderr (what is being waited for, how long is left); no token is ever printed.
//!
//! - [`authorization_code`]: RFC 6749 4.1 with PKCE S256 (RFC 7636) and a loopback redirect on
//!   `127.0.0.1` with a port chosen by the system (RFC 8252 7.3); the `state` is checked.
//! - [`device_code`]: RFC 8628, polling at the server's interval, slowing down when told.
//! - [`client_credentials`]: RFC 6749 4.4, for service accounts.

use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::client::{oauth_error, ClientCredentials, EndpointClient};
use super::{form_encode, parse_query, random_token, OAuthError, OAuthSettings, TokenSet};

/// RFC 8628 3.5: the polling interval when the server gives none, and the step of `slow_down`.
const DEFAULT_INTERVAL: u64 = 5;
const SLOW_DOWN_STEP: u64 = 5;
/// How often a waiting login says how long is left.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Largest request head accepted on the loopback redirect listener.
const MAX_REDIRECT_HEAD: usize = 16 * 1024;

/// How a login talks to the person running it.
#[derive(Debug, Clone)]
pub struct Interaction {
    /// Try to open a browser (only when a display is available).
    pub open_browser: bool,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Interaction {
    /// Open `url` in a browser when there is a display; `true` if a browser was started.
    fn open(&self, url: &str) -> bool {
        let display = ["DISPLAY", "WAYLAND_DISPLAY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if !self.open_browser || !display {
            return false;
        }
        // The URL carries no secret (PKCE sends only the challenge), so argv is fine.
        std::process::Command::new("xdg-open")
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
    }
}

/// Authorization code grant with PKCE and a loopback redirect.
pub async fn authorization_code(
    settings: &OAuthSettings,
    client: &EndpointClient,
    creds: &ClientCredentials<'_>,
    interaction: &Interaction,
) -> Result<TokenSet, OAuthError> {
    let authorize_url = settings.authorize_url.as_deref().ok_or_else(|| {
        OAuthError::Config(format!(
            "provider {} has no authorize_url{}",
            settings.provider,
            if settings.device_flow {
                ": use --device"
            } else {
                ""
            }
        ))
    })?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let state = random_token()?;
    let verifier = random_token()?;
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
    let scope = settings.scopes.join(" ");
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", settings.client_id.as_str()),
        ("redirect_uri", redirect_uri.as_str()),
        ("state", state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    if !scope.is_empty() {
        params.push(("scope", scope.as_str()));
    }
    let query = params
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let sep = if authorize_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{authorize_url}{sep}{query}");

    let opened = interaction.open(&url);
    eprintln!(
        "{} the {} login page{}:\n\n  {url}\n",
        if opened { "Opened" } else { "Open" },
        settings.display_name,
        if opened {
            " in your browser; if it did not appear, open"
        } else {
            " in a browser"
        }
    );
    let code = wait_for_redirect(
        &listener,
        &state,
        &settings.display_name,
        interaction.timeout,
    )
    .await?;
    eprintln!("Authorization received; getting tokens from the token endpoint...");
    client
        .token_request(
            &settings.token_url,
            &[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect_uri.as_str()),
                ("code_verifier", verifier.as_str()),
            ],
            creds,
        )
        .await
}

/// Serve the loopback redirect until the browser comes back with a code (or an error), or
/// the timeout. Other paths (a favicon) get 404 and the wait goes on; a wrong `state` ends
/// the login.
async fn wait_for_redirect(
    listener: &TcpListener,
    state: &str,
    display_name: &str,
    timeout: Duration,
) -> Result<String, OAuthError> {
    let deadline = Instant::now() + timeout;
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    eprintln!(
        "Waiting for the browser to return to {} (times out in {} s; Ctrl-C to cancel)...",
        listener.local_addr()?,
        timeout.as_secs()
    );
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(OAuthError::Timeout(timeout.as_secs()));
        }
        if now >= next_progress {
            eprintln!(
                "Still waiting for the browser ({} s left)...",
                deadline.saturating_duration_since(now).as_secs()
            );
            next_progress = now + PROGRESS_EVERY;
        }
        let wait = deadline.min(next_progress).saturating_duration_since(now);
        let Ok(accepted) = tokio::time::timeout(wait, listener.accept()).await else {
            continue;
        };
        let (mut stream, _) = accepted?;
        let Ok(Some(target)) =
            tokio::time::timeout(Duration::from_secs(10), read_request_target(&mut stream))
                .await
                .unwrap_or(Ok(None))
        else {
            continue;
        };
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        if path != "/callback" {
            respond(&mut stream, 404, "Not found.").await;
            continue;
        }
        let params = parse_query(query);
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if get("state") != Some(state) {
            respond(
                &mut stream,
                400,
                "Login aborted: this redirect does not belong to the login broker started \
                 (state mismatch). Run 'broker login' again.",
            )
            .await;
            return Err(OAuthError::StateMismatch);
        }
        if let Some(error) = get("error") {
            respond(
                &mut stream,
                400,
                &format!(
                    "Login failed: {}. You can close this tab.",
                    html_escape(error)
                ),
            )
            .await;
            return Err(if error == "access_denied" {
                OAuthError::AccessDenied
            } else {
                OAuthError::Server {
                    error: error.to_string(),
                    description: get("error_description").map(str::to_string),
                }
            });
        }
        let Some(code) = get("code").filter(|c| !c.is_empty()) else {
            respond(&mut stream, 400, "Login failed: no authorization code.").await;
            return Err(OAuthError::Server {
                error: "no code in the redirect".into(),
                description: None,
            });
        };
        let code = code.to_string();
        respond(
            &mut stream,
            200,
            &format!(
                "Logged in to {} for broker. You can close this tab.",
                html_escape(display_name)
            ),
        )
        .await;
        return Ok(code);
    }
}

/// The request target of an HTTP/1 request head, or `None` if it is not one.
async fn read_request_target(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_REDIRECT_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Ok(Some(target.to_string())),
        _ => Ok(None),
    }
}

async fn respond(stream: &mut TcpStream, status: u16, text: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>broker login</title></head>\
         <body><p>{text}</p></body></html>\n"
    );
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/html; charset=utf-8\r\n\
         content-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Device authorization grant (RFC 8628).
pub async fn device_code(
    settings: &OAuthSettings,
    client: &EndpointClient,
    creds: &ClientCredentials<'_>,
    interaction: &Interaction,
) -> Result<TokenSet, OAuthError> {
    let device_url = settings.device_url.as_deref().ok_or_else(|| {
        OAuthError::Config(format!(
            "provider {} does not support the device flow (no device_url)",
            settings.provider
        ))
    })?;
    let scope = settings.scopes.join(" ");
    let mut form = Vec::new();
    if !scope.is_empty() {
        form.push(("scope", scope.as_str()));
    }
    let answer = client.post_form(device_url, &form, creds).await?;
    if let Some(err) = oauth_error(&answer) {
        return Err(err);
    }
    let field = |name: &str| answer.json.get(name).and_then(|v| v.as_str());
    let number = |name: &str| {
        answer.json.get(name).and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    };
    let bad = || OAuthError::BadResponse {
        url: device_url.to_string(),
        status: answer.status,
    };
    let device_code = field("device_code").ok_or_else(bad)?.to_string();
    let user_code = field("user_code").ok_or_else(bad)?;
    // Google says verification_url.
    let verification_uri = field("verification_uri")
        .or_else(|| field("verification_url"))
        .ok_or_else(bad)?;
    let complete = field("verification_uri_complete");
    let expires_in = number("expires_in").unwrap_or(900);
    let mut interval = number("interval").unwrap_or(DEFAULT_INTERVAL).max(1);

    eprintln!(
        "To log in to {}, open\n\n  {verification_uri}\n\nand enter the code\n\n  {user_code}\n",
        settings.display_name
    );
    if let Some(complete) = complete {
        eprintln!("(or open {complete} , which carries the code)\n");
    }
    interaction.open(complete.unwrap_or(verification_uri));
    let limit = Duration::from_secs(expires_in).min(interaction.timeout);
    let deadline = Instant::now() + limit;
    eprintln!(
        "Waiting for the code to be approved (expires in {} s)...",
        limit.as_secs()
    );
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    loop {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        let now = Instant::now();
        if now >= deadline {
            return Err(OAuthError::ExpiredToken);
        }
        if now >= next_progress {
            eprintln!(
                "Still waiting for approval of code {user_code} ({} s left)...",
                deadline.saturating_duration_since(now).as_secs()
            );
            next_progress = now + PROGRESS_EVERY;
        }
        let answer = client
            .post_form(
                &settings.token_url,
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", device_code.as_str()),
                ],
                creds,
            )
            .await?;
        match oauth_error(&answer) {
            None => return super::client::parse_token_answer(&settings.token_url, answer),
            Some(OAuthError::Server { error, description }) => match error.as_str() {
                "authorization_pending" => {}
                "slow_down" => {
                    interval += SLOW_DOWN_STEP;
                    eprintln!("The server asked to slow down: polling every {interval} s.");
                }
                "access_denied" => return Err(OAuthError::AccessDenied),
                "expired_token" => return Err(OAuthError::ExpiredToken),
                _ => return Err(OAuthError::Server { error, description }),
            },
            Some(other) => return Err(other),
        }
    }
}

/// Client credentials grant (a service account: no user, no refresh token).
pub async fn client_credentials(
    settings: &OAuthSettings,
    client: &EndpointClient,
    creds: &ClientCredentials<'_>,
) -> Result<TokenSet, OAuthError> {
    let scope = settings.scopes.join(" ");
    let mut form = vec![("grant_type", "client_credentials")];
    if !scope.is_empty() {
        form.push(("scope", scope.as_str()));
    }
    client
        .token_request(&settings.token_url, &form, creds)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redirect_with_a_forged_state_is_refused_and_favicon_ignored() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let browser = tokio::spawn(async move {
            let get = |target: &'static str| async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .await
                    .expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).await.expect("read");
                out
            };
            let favicon = get("/favicon.ico").await;
            let forged = get("/callback?code=c&state=forged").await;
            (favicon, forged)
        });
        let err = wait_for_redirect(&listener, "expected", "Acme", Duration::from_secs(10))
            .await
            .expect_err("forged state");
        assert!(matches!(err, OAuthError::StateMismatch));
        let (favicon, forged) = browser.await.expect("browser");
        assert!(favicon.starts_with("HTTP/1.1 404"));
        assert!(forged.starts_with("HTTP/1.1 400"), "{forged}");
    }

    #[tokio::test]
    async fn redirect_with_the_right_state_gives_the_code() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /callback?code=the%2Bcode&state=st HTTP/1.1\r\n\r\n")
                .await
                .expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
        });
        let code = wait_for_redirect(&listener, "st", "Acme", Duration::from_secs(10))
            .await
            .expect("code");
        assert_eq!(code, "the+code");
    }
}
