//! Revoking a login's tokens at the authorization server (RFC 7009), for [`super::logout`]:
//! `broker logout`, and the system broker itself on `broker logout --system` (its tokens never
//! leave it). The refresh token goes first: revoking it usually ends the whole grant.

use super::client::{oauth_error, ClientCredentials, EndpointClient};
use super::TokenMeta;
use crate::vault::StoredCredential;

/// What a revocation achieved. Nothing in it is secret: a server's error text is redacted of
/// every form of the credential's secrets.
#[derive(Debug, Default)]
pub struct Revocation {
    /// The login has a revocation endpoint (without one the tokens stay valid at the server
    /// until they expire).
    pub endpoint: bool,
    /// The tokens the server confirmed (`"refresh token"`, `"access token"`).
    pub revoked: Vec<&'static str>,
    /// The tokens the server did not confirm (`"refresh token"`, ...), each with why.
    pub failures: Vec<(&'static str, String)>,
}

impl Revocation {
    /// The sentence for people when there is no endpoint.
    pub fn no_endpoint_note(provider: &str) -> String {
        format!(
            "{provider} has no revocation endpoint: the tokens stay valid at the server until they \
             expire (revoke the app's access in your account settings to end them now)."
        )
    }
}

/// Revoke `cred`'s tokens at the revocation endpoint of its stored [`TokenMeta`].
pub async fn revoke_login(client: &EndpointClient, cred: &StoredCredential) -> Revocation {
    let Some(meta) = TokenMeta::from_json(&cred.metadata) else {
        return Revocation::default();
    };
    let Some(url) = meta.revoke_url.as_deref() else {
        return Revocation::default();
    };
    let mut out = Revocation {
        endpoint: true,
        ..Revocation::default()
    };
    let creds = ClientCredentials {
        client_id: &meta.client_id,
        auth: meta.client_auth,
        secret: cred.client_secret.as_ref().map(|s| s.expose()),
    };
    let tokens = [
        ("refresh token", "refresh_token", cred.refresh.as_ref()),
        ("access token", "access_token", Some(&cred.secret)),
    ];
    // The server's error text may quote what it was sent: redacted.
    let secrets = cred.secret_bytes();
    let redacted = |text: String| crate::proxy::redact_text(text.as_bytes(), &secrets);
    for (what, hint, token) in tokens {
        let Some(token) = token else { continue };
        let result = client
            .post_form(
                url,
                &[("token", token.expose()), ("token_type_hint", hint)],
                &creds,
            )
            .await;
        match result {
            // RFC 7009 2.2: 200 whether or not the token was still valid.
            Ok(answer) if answer.status == 200 => out.revoked.push(what),
            Ok(answer) => out.failures.push((
                what,
                redacted(
                    oauth_error(&answer)
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| format!("{url} answered {}", answer.status)),
                ),
            )),
            Err(err) => out.failures.push((what, redacted(err.to_string()))),
        }
    }
    out
}
