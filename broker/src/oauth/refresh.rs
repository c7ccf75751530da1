//! The credential the proxy sends, with OAuth tokens refreshed before they expire.
//!
//! Single flight across processes: several brokers (two `broker run`s and a `broker serve`)
//! may find the same access token expiring at the same moment, and a rotating refresh token
//! can be spent only once (the server revokes the whole grant when a spent one comes back).
//! So the refresh happens inside the vault's write lock ([`Vault::with_credential_lock`],
//! SQLite `BEGIN IMMEDIATE`): the first process to take the lock re-reads the row, refreshes,
//! stores the new refresh token together with the new access token, and commits before
//! anything uses the new access token; every other process blocks on the lock, re-reads the row
//! once it has it, finds a fresh token, and does not refresh. Threads of one process are
//! serialised the same way (the vault's connection mutex).
//!
//! A refresh the server refuses (`invalid_grant`, ...) marks the login expired in the row's
//! metadata: every later use answers `login expired: run 'broker login <provider>'` without
//! asking the server again. A transient failure (network, 5xx) marks nothing; the old access
//! token is used while it is still valid.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::client::{ClientCredentials, EndpointClient};
use super::{expiry_from_now, GrantUsed, OAuthError, TokenMeta};
use crate::audit::{Audit, AuditEvent, EventKind};
use crate::home::Home;
use crate::proxy::UpstreamSettings;
use crate::vault::{CredentialKind, StoredCredential, TokenUpdate, Vault, VaultError};

/// Refresh this long before the access token expires (at most half its lifetime, so a token
/// that lives only a minute is not refreshed on every use).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Why no usable credential could be produced.
#[derive(Debug, thiserror::Error)]
pub enum FreshError {
    /// The refresh token was refused (or there is none and the token expired): log in again.
    #[error("login expired")]
    LoginExpired,
    /// The vault or the token endpoint failed; the message says which.
    #[error("{0}")]
    Unavailable(String),
    /// The stored credential failed its integrity check: nothing was sent.
    #[error("{0}")]
    Integrity(String),
}

impl From<VaultError> for FreshError {
    fn from(e: VaultError) -> FreshError {
        match e {
            VaultError::Integrity { .. } => FreshError::Integrity(e.to_string()),
            e => FreshError::Unavailable(e.to_string()),
        }
    }
}

/// How the broker reaches token endpoints for refreshes.
#[derive(Debug, Clone, Default)]
pub struct TokenEndpoints {
    /// The upstream settings (`--resolve`, `--upstream-ca`, the upstream proxy).
    pub upstream: UpstreamSettings,
    /// Providers whose endpoints may resolve to private addresses (`private_addresses =
    /// true`); every other provider's are behind the SSRF guard.
    pub private_providers: Vec<String>,
}

impl TokenEndpoints {
    fn client_for(&self, provider: &str) -> EndpointClient {
        let private = self.private_providers.iter().any(|p| p == provider);
        EndpointClient::new(self.upstream.clone(), private)
    }
}

/// The secret to send for `provider`/`profile`: an API key as stored, an OAuth access token
/// refreshed first when it is about to expire. `Ok(None)` when nothing is stored.
pub fn current_secret(
    vault: &Vault,
    home: &Home,
    endpoints: &TokenEndpoints,
    provider: &str,
    profile: &str,
) -> Result<Option<Zeroizing<String>>, FreshError> {
    let Some(cred) = vault.get_full(provider, profile)? else {
        return Ok(None);
    };
    if cred.kind != CredentialKind::OAuth2 {
        return Ok(Some(Zeroizing::new(cred.secret.expose().to_string())));
    }
    match plan(&cred, OffsetDateTime::now_utc()) {
        Plan::Use => return Ok(Some(Zeroizing::new(cred.secret.expose().to_string()))),
        Plan::Expired => return Err(FreshError::LoginExpired),
        Plan::Refresh => {}
    }
    drop(cred);
    refresh_locked(vault, home, endpoints, provider, profile, None)
}

/// After the upstream answered 401 to `rejected` (the access token the proxy sent): refresh
/// once, unless the stored token is no longer `rejected` (another request or process already
/// refreshed it; that one is returned). Same single flight as [`current_secret`]. `Ok(None)`
/// when nothing is stored; an API key or a token that cannot be renewed comes back as is
/// (the proxy then passes the 401 on).
pub fn refresh_after_rejection(
    vault: &Vault,
    home: &Home,
    endpoints: &TokenEndpoints,
    provider: &str,
    profile: &str,
    rejected: &str,
) -> Result<Option<Zeroizing<String>>, FreshError> {
    refresh_locked(vault, home, endpoints, provider, profile, Some(rejected))
}

/// Under the vault's write lock: re-read, and refresh if still due (or if the stored token is
/// still the `rejected` one).
fn refresh_locked(
    vault: &Vault,
    home: &Home,
    endpoints: &TokenEndpoints,
    provider: &str,
    profile: &str,
    rejected: Option<&str>,
) -> Result<Option<Zeroizing<String>>, FreshError> {
    // Audited after the vault's write lock is released: the audit moves its head in the
    // vault, through a connection of its own.
    let mut audited: Option<Option<String>> = None;
    let result = vault.with_credential_lock(provider, profile, |locked| {
        // Re-read under the lock: another process may have refreshed while we waited.
        let Some(cred) = locked.read()? else {
            return Ok(None);
        };
        if cred.kind != CredentialKind::OAuth2 {
            return Ok(Some(Zeroizing::new(cred.secret.expose().to_string())));
        }
        let now = OffsetDateTime::now_utc();
        let due = match rejected {
            Some(rejected) if cred.secret.expose() == rejected => match plan(&cred, now) {
                Plan::Expired => Plan::Expired,
                _ if renewable(&cred) => Plan::Refresh,
                _ => Plan::Use,
            },
            _ => plan(&cred, now),
        };
        match due {
            Plan::Use => return Ok(Some(Zeroizing::new(cred.secret.expose().to_string()))),
            Plan::Expired => return Err(FreshError::LoginExpired),
            Plan::Refresh => {}
        }
        let Some(mut meta) = TokenMeta::from_json(&cred.metadata) else {
            return Err(FreshError::LoginExpired);
        };
        match run_blocking(refresh_tokens(endpoints, provider, &meta, &cred)) {
            Ok(tokens) => {
                meta.login_expired = false;
                locked.store_tokens(&TokenUpdate {
                    access: &tokens.access_token,
                    refresh: tokens.refresh_token.as_ref().map(|r| r.as_str()),
                    expires_at: tokens.expires_in.map(expiry_from_now),
                    metadata: &meta.to_json(),
                })?;
                audited = Some(None);
                Ok(Some(tokens.access_token))
            }
            Err(err) if err.is_grant_rejected() => {
                meta.login_expired = true;
                locked.set_metadata(&meta.to_json())?;
                audited = Some(Some(refusal_reason(&err)));
                let err = redacted(&err, &cred);
                tracing::warn!(provider, profile, "refresh refused ({err}): login expired");
                Err(FreshError::LoginExpired)
            }
            Err(err) => {
                audited = Some(Some("refresh failed: endpoint unavailable".into()));
                let still_valid = expires_at(&cred).is_none_or(|t| t > OffsetDateTime::now_utc());
                if still_valid {
                    let err = redacted(&err, &cred);
                    tracing::warn!(
                        provider,
                        profile,
                        "cannot refresh yet ({err}); using the current token"
                    );
                    Ok(Some(Zeroizing::new(cred.secret.expose().to_string())))
                } else {
                    tracing::warn!(
                        provider,
                        profile,
                        "the token expired and cannot be refreshed: {}",
                        redacted(&err, &cred)
                    );
                    Err(FreshError::Unavailable(format!(
                        "the {provider} token expired and cannot be refreshed: {}",
                        generic_reason(&err)
                    )))
                }
            }
        }
    });
    if let Some(failure) = audited {
        audit(vault, home, provider, profile, failure);
    }
    result
}

#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Use,
    Refresh,
    Expired,
}

fn expires_at(cred: &StoredCredential) -> Option<OffsetDateTime> {
    cred.expires_at
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
}

/// What to do with a stored OAuth credential at `now`.
fn plan(cred: &StoredCredential, now: OffsetDateTime) -> Plan {
    let meta = TokenMeta::from_json(&cred.metadata);
    if meta.as_ref().is_some_and(|m| m.login_expired) {
        return Plan::Expired;
    }
    // No expiry known: use it until the server says otherwise.
    let Some(expires) = expires_at(cred) else {
        return Plan::Use;
    };
    let issued = OffsetDateTime::parse(&cred.updated_at, &Rfc3339).unwrap_or(now);
    let lifetime = (expires - issued).max(time::Duration::ZERO);
    let margin = time::Duration::try_from(REFRESH_MARGIN)
        .unwrap_or(time::Duration::MINUTE)
        .min(lifetime / 2);
    if now + margin < expires {
        return Plan::Use;
    }
    match (renewable(cred), now < expires) {
        (true, _) => Plan::Refresh,
        // Not renewable: use it while it lasts.
        (false, true) => Plan::Use,
        (false, false) => Plan::Expired,
    }
}

/// Can new tokens be had without the user: a refresh token, or a client-credentials login
/// with its client secret.
fn renewable(cred: &StoredCredential) -> bool {
    cred.refresh.is_some()
        || TokenMeta::from_json(&cred.metadata).is_some_and(|m| {
            m.grant == GrantUsed::ClientCredentials && cred.client_secret.is_some()
        })
}

/// One request to the token endpoint for new tokens.
async fn refresh_tokens(
    endpoints: &TokenEndpoints,
    provider: &str,
    meta: &TokenMeta,
    cred: &StoredCredential,
) -> Result<super::TokenSet, OAuthError> {
    let client = endpoints.client_for(provider);
    let creds = ClientCredentials {
        client_id: &meta.client_id,
        auth: meta.client_auth,
        secret: cred.client_secret.as_ref().map(|s| s.expose()),
    };
    let scope = meta.scopes.join(" ");
    match (&cred.refresh, meta.grant) {
        (Some(refresh), _) => {
            client
                .token_request(
                    &meta.token_url,
                    &[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", refresh.expose()),
                    ],
                    &creds,
                )
                .await
        }
        (None, GrantUsed::ClientCredentials) => {
            let mut form = vec![("grant_type", "client_credentials")];
            if !scope.is_empty() {
                form.push(("scope", scope.as_str()));
            }
            client.token_request(&meta.token_url, &form, &creds).await
        }
        (None, _) => Err(OAuthError::Server {
            error: "invalid_grant".into(),
            description: Some("no refresh token stored".into()),
        }),
    }
}

/// `err` for the broker's log, with every form of the credential's secrets overwritten: a token
/// endpoint's error (its description, an echoed form) may quote the refresh token or the
/// client secret it was sent.
fn redacted(err: &OAuthError, cred: &StoredCredential) -> String {
    crate::proxy::redact_text(err.to_string().as_bytes(), &cred.secret_bytes())
}

/// What the agent is told about a failed refresh: the kind of failure and the endpoint, nothing
/// the server wrote (that goes to the log, redacted).
fn generic_reason(err: &OAuthError) -> String {
    match err {
        OAuthError::Endpoint { url, .. } => format!("cannot reach the token endpoint {url}"),
        OAuthError::BadResponse { url, status } => {
            format!("{url} answered {status} without an OAuth response")
        }
        OAuthError::Server { .. } => format!("{}; see the broker's log", refusal_reason(err)),
        _ => "the refresh failed; see the broker's log".into(),
    }
}

/// A fixed phrase for the audit log (the server's description is free text: left out).
fn refusal_reason(err: &OAuthError) -> String {
    match err {
        OAuthError::Server { error, .. } => format!(
            "refresh refused: {}",
            error
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(40)
                .collect::<String>()
        ),
        _ => "refresh refused".into(),
    }
}

fn audit(vault: &Vault, home: &Home, provider: &str, profile: &str, failure: Option<String>) {
    let event = AuditEvent {
        provider: Some(provider.to_string()),
        profile: Some(profile.to_string()),
        pid: Some(std::process::id()),
        reason: failure,
        ..AuditEvent::new(EventKind::Refresh)
    };
    if let Err(err) = Audit::open(home, vault).and_then(|a| a.append(event)) {
        tracing::warn!("cannot write the audit log: {err}");
    }
}

/// Run `fut` to completion from synchronous code, whatever thread this is: on a thread of its
/// own with a one-thread runtime (a refresh is rare; this never nests runtimes).
pub fn run_blocking<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
        })
        .join()
    })
    .unwrap_or_else(|_| panic!("refresh thread panicked"))
    .unwrap_or_else(|e| panic!("cannot start a runtime for the refresh: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ClientAuth;
    use crate::vault::Secret;

    fn cred(
        issued: &str,
        expires: Option<&str>,
        refresh: bool,
        expired_flag: bool,
    ) -> StoredCredential {
        let meta = TokenMeta {
            token_url: "https://idp.example/token".into(),
            revoke_url: None,
            client_id: "c".into(),
            client_auth: ClientAuth::None,
            scopes: vec![],
            grant: GrantUsed::AuthorizationCode,
            login_expired: expired_flag,
        };
        StoredCredential {
            kind: CredentialKind::OAuth2,
            secret: Secret::new("at".into()),
            refresh: refresh.then(|| Secret::new("rt".into())),
            client_secret: None,
            expires_at: expires.map(str::to_string),
            metadata: meta.to_json(),
            updated_at: issued.into(),
            created_at: issued.into(),
        }
    }

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).expect("time")
    }

    #[test]
    fn refresh_plan_follows_margin_lifetime_and_marks() {
        let issued = "2030-01-01T00:00:00Z";
        let hour = Some("2030-01-01T01:00:00Z");
        // Fresh, then within the 60 s margin, then past expiry.
        assert_eq!(
            plan(&cred(issued, hour, true, false), at("2030-01-01T00:30:00Z")),
            Plan::Use
        );
        assert_eq!(
            plan(&cred(issued, hour, true, false), at("2030-01-01T00:59:30Z")),
            Plan::Refresh
        );
        assert_eq!(
            plan(&cred(issued, hour, true, false), at("2030-01-01T02:00:00Z")),
            Plan::Refresh
        );
        // Without a refresh token: used until it expires, then the login is expired.
        assert_eq!(
            plan(
                &cred(issued, hour, false, false),
                at("2030-01-01T00:59:30Z")
            ),
            Plan::Use
        );
        assert_eq!(
            plan(
                &cred(issued, hour, false, false),
                at("2030-01-01T02:00:00Z")
            ),
            Plan::Expired
        );
        // A 20 s token is refreshed in its last 10 s, not on every use.
        let short = Some("2030-01-01T00:00:20Z");
        assert_eq!(
            plan(
                &cred(issued, short, true, false),
                at("2030-01-01T00:00:05Z")
            ),
            Plan::Use
        );
        assert_eq!(
            plan(
                &cred(issued, short, true, false),
                at("2030-01-01T00:00:15Z")
            ),
            Plan::Refresh
        );
        // No expiry known; a refused refresh.
        assert_eq!(
            plan(&cred(issued, None, true, false), at("2031-01-01T00:00:00Z")),
            Plan::Use
        );
        assert_eq!(
            plan(&cred(issued, hour, true, true), at("2030-01-01T00:00:01Z")),
            Plan::Expired
        );
    }
}
