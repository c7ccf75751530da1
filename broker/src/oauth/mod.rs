//! OAuth logins and the token lifecycle: `broker login` gets tokens (authorization code with
//! PKCE, device authorization, client credentials), the vault keeps them sealed, the proxy
//! refreshes them before they expire, `broker logout` revokes them.
//!
//! - [`settings`]: where a provider's endpoints and client id come from (the provider
//!   definition, `$BROKER_HOME/config.toml`, flags).
//! - [`client`]: the token-endpoint HTTP client (https anywhere, plain http to loopback only).
//! - [`flows`]: the grants `broker login` runs.
//! - [`refresh`]: the credential lookup the proxy uses for OAuth tokens, with a cross-process
//!   single-flight refresh under the vault's write lock.
//! - [`revoke`]: revoking a login's tokens at the authorization server.
//! - [`logout`]: `broker logout` and `broker logout --system`: revoke, then remove the row
//!   unless a refresh rotated the tokens meanwhile (then revoke those too).
//!
//! What is stored per login (no secret outside sealed columns): the access token, the refresh
//! token and a confidential client's secret, sealed; the expiry; and [`TokenMeta`] as the
//! row's metadata JSON, so refresh and revocation need neither the catalog nor the config.

pub mod client;
pub mod flows;
pub mod logout;
pub mod refresh;
pub mod revoke;
pub mod settings;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::providers::ClientAuth;
use crate::vault::VaultError;

pub use settings::{OAuthSettings, UserConfig};

/// How long one request to a token, device or revocation endpoint may take. Shorter than the
/// vault's busy timeout (15 s): a refresh runs while holding the vault's write lock.
pub const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the OAuth flows. Messages say what to do; none contains a token or secret.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach {url}: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("{url} answered {status} without an OAuth response")]
    BadResponse { url: String, status: u16 },
    #[error("the authorization server refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        error: String,
        description: Option<String>,
    },
    #[error("the login was denied at the authorization server (access_denied)")]
    AccessDenied,
    #[error("the code expired before it was approved (expired_token): run 'broker login' again")]
    ExpiredToken,
    #[error("no answer from the browser within {0} s: run 'broker login' again (or use --device on a machine without a browser)")]
    Timeout(u64),
    #[error("the redirect came back with a different 'state' than this login sent: possible cross-site request forgery, login aborted")]
    StateMismatch,
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl OAuthError {
    /// Does the authorization server say the grant itself is no good (the user must log in
    /// again), rather than a transient failure?
    pub fn is_grant_rejected(&self) -> bool {
        matches!(
            self,
            OAuthError::Server { error, .. }
                if matches!(error.as_str(), "invalid_grant" | "invalid_client" | "unauthorized_client" | "invalid_scope")
        )
    }
}

/// Tokens from a token endpoint. `Debug` never prints them.
pub struct TokenSet {
    pub access_token: Zeroizing<String>,
    pub refresh_token: Option<Zeroizing<String>>,
    pub expires_in: Option<u64>,
    pub scope: Option<String>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "***"))
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Which grant obtained a login; a client-credentials login is renewed by running that grant
/// again (there is no refresh token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantUsed {
    AuthorizationCode,
    DeviceCode,
    ClientCredentials,
}

impl GrantUsed {
    /// The grant's name for people (and the audit's `reason` of a login).
    pub fn describe(self) -> &'static str {
        match self {
            GrantUsed::AuthorizationCode => "authorization code with PKCE",
            GrantUsed::DeviceCode => "device code",
            GrantUsed::ClientCredentials => "client credentials",
        }
    }
}

/// Non-secret OAuth state stored with a login (the vault row's `metadata`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMeta {
    pub token_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_url: Option<String>,
    pub client_id: String,
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub grant: GrantUsed,
    /// A refresh was refused by the server: the user must log in again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub login_expired: bool,
}

impl TokenMeta {
    /// What a new login keeps beside its tokens: where and as which client to refresh and
    /// revoke them, from the broker's own settings.
    pub fn for_login(settings: &OAuthSettings, grant: GrantUsed) -> TokenMeta {
        TokenMeta {
            token_url: settings.token_url.clone(),
            revoke_url: settings.revoke_url.clone(),
            client_id: settings.client_id.clone(),
            client_auth: settings.client_auth,
            scopes: settings.scopes.clone(),
            grant,
            login_expired: false,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    pub fn from_json(s: &str) -> Option<TokenMeta> {
        serde_json::from_str(s).ok()
    }
}

/// RFC 3339 UTC time `secs` seconds from now.
pub fn expiry_from_now(secs: u64) -> String {
    let secs = i64::try_from(secs)
        .unwrap_or(i64::MAX / 4)
        .min(10 * 365 * 86400);
    crate::audit::format_rfc3339(time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
}

/// Random bytes, base64url without padding (PKCE verifier, `state`).
pub(crate) fn random_token() -> Result<String, OAuthError> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| OAuthError::Config("the system random generator failed".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

pub use crate::form::{decode as form_decode, encode as form_encode};

/// Parse a query string into pairs.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (form_decode(k), form_decode(v)),
            None => (form_decode(p), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_round_trips() {
        let s = "a b&c=d/é~._-";
        assert_eq!(form_decode(&form_encode(s)), s);
        assert_eq!(
            form_encode("openid offline_access"),
            "openid%20offline_access"
        );
        let q = parse_query("code=abc%2Fdef&state=x+y&empty");
        assert_eq!(
            q,
            vec![
                ("code".into(), "abc/def".into()),
                ("state".into(), "x y".into()),
                ("empty".into(), String::new())
            ]
        );
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%4"), "%4");
    }

    #[test]
    fn meta_round_trips_and_grant_errors_are_classified() {
        let meta = TokenMeta {
            token_url: "https://idp.example/token".into(),
            revoke_url: None,
            client_id: "cid".into(),
            client_auth: ClientAuth::None,
            scopes: vec!["a".into()],
            grant: GrantUsed::DeviceCode,
            login_expired: false,
        };
        assert_eq!(TokenMeta::from_json(&meta.to_json()), Some(meta));
        assert!(OAuthError::Server {
            error: "invalid_grant".into(),
            description: None
        }
        .is_grant_rejected());
        assert!(!OAuthError::Server {
            error: "temporarily_unavailable".into(),
            description: None
        }
        .is_grant_rejected());
    }
}
