//! OAuth logins of the system broker, its side: `broker login | logout --system` from an admin
//! uid (checked by the caller, [`super::admin::answer`]).
//!
//! The settings are the broker's: the provider definitions of its catalog (built-ins and
//! root's `/etc/broker/providers`) and the `[oauth.<provider>]` tables of root's
//! `/etc/broker/config.toml`, never anything of the admin's. The admin's CLI gets their public
//! part ([`settings`]), runs the grant where the admin is (a browser, a device code), and sends
//! the tokens; [`store`] resolves the settings again and builds the row's
//! [`TokenMeta`] from them, so the token and revocation endpoints the broker will send the
//! refresh token to are root's choice, not the admin's. An admin chooses the scopes (as
//! `broker login --scopes` does) but not the client: `--client-id` is refused by the CLI.

use crate::audit::EventKind;
use crate::control::ControlPeer;
use crate::oauth::client::EndpointClient;
use crate::oauth::logout::{self, LogoutError};
use crate::oauth::revoke::revoke_login;
use crate::oauth::{expiry_from_now, OAuthSettings, TokenMeta};
use crate::proxy::Proxy;
use crate::vault::{PutOutcome, TokenUpdate, Vault};

use super::admin::{audit_change, known_provider, AdminContext, AdminReply, AdminRequest};

/// The broker's settings for a login to `provider`, with `scopes` if the admin asked for
/// other ones.
fn resolve(
    proxy: &Proxy,
    admin: &AdminContext,
    provider: &str,
    scopes: Option<&[String]>,
) -> Result<OAuthSettings, AdminReply> {
    let found = known_provider(proxy, provider, None)?;
    OAuthSettings::resolve(found, &admin.oauth, None, scopes)
        .map_err(|e| AdminReply::error(e.to_string()))
}

/// Answer `oauth_settings`: what the CLI needs to run the grant. Nothing in it is secret.
pub(super) fn settings(
    proxy: &Proxy,
    admin: &AdminContext,
    provider: &str,
    scopes: Option<&[String]>,
) -> AdminReply {
    match resolve(proxy, admin, provider, scopes) {
        Ok(settings) => AdminReply::Ok {
            message: String::new(),
            credentials: Vec::new(),
            oauth: Some(Box::new(settings)),
        },
        Err(refused) => refused,
    }
}

/// Store the tokens of an admin's login (`request` is [`AdminRequest::Login`]).
pub(super) fn store(
    proxy: &Proxy,
    admin: &AdminContext,
    vault: &Vault,
    peer: ControlPeer,
    request: &AdminRequest,
) -> AdminReply {
    let AdminRequest::Login {
        provider,
        profile,
        grant,
        scopes,
        access_token,
        refresh_token,
        expires_in,
        client_secret,
    } = request
    else {
        return AdminReply::error("not a login");
    };
    let found = match known_provider(proxy, provider, Some(profile)) {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let settings = match resolve(proxy, admin, provider, scopes.as_deref()) {
        Ok(settings) => settings,
        Err(refused) => return refused,
    };
    if !settings.supports(*grant) {
        return AdminReply::error(format!(
            "{} logins do not use the {} grant with the system broker's settings: run `broker login {provider} --system` again",
            settings.display_name,
            grant.describe()
        ));
    }
    // The secret is used at the token endpoint on every refresh: one for a public client
    // would be sent where none belongs, none for a confidential one could never refresh.
    match (settings.confidential(), client_secret.is_some()) {
        (true, false) => {
            return AdminReply::error(format!(
                "{} uses a confidential OAuth client: the login needs its client secret",
                settings.display_name
            ))
        }
        (false, true) => {
            return AdminReply::error(format!(
                "{} uses a public OAuth client (client_auth = \"none\"): no client secret is taken",
                settings.display_name
            ))
        }
        _ => {}
    }
    if found.is_placeholder(access_token) {
        return AdminReply::error(format!(
            "that is broker's placeholder for {provider}, not an access token"
        ));
    }
    let meta = TokenMeta::for_login(&settings, *grant);
    let tokens = TokenUpdate {
        access: access_token,
        refresh: refresh_token.as_deref(),
        expires_at: expires_in.map(expiry_from_now),
        metadata: &meta.to_json(),
    };
    let outcome = match vault.put_oauth(provider, profile, &tokens, client_secret.as_deref()) {
        Ok(outcome) => outcome,
        Err(err) => return AdminReply::error(err.to_string()),
    };
    // The hosts of the definition in effect (root's) are the ones accepted for it.
    let grants = crate::providers::trust::grants(found);
    if let Err(err) = vault.set_trusted_grants(provider, &grants) {
        return AdminReply::error(err.to_string());
    }
    audit_change(
        proxy,
        peer,
        EventKind::Login,
        (provider, profile),
        "broker login --system",
        Some(grant.describe().to_string()),
    );
    AdminReply::ok(format!(
        "Logged the system broker in to {} (profile {profile}); {} its tokens: access token{}{}.",
        settings.display_name,
        match outcome {
            PutOutcome::Added => "stored",
            PutOutcome::Replaced => "replaced",
        },
        expires_in
            .map(|s| format!(" (expires in {s} s)"))
            .unwrap_or_default(),
        if refresh_token.is_some() {
            ", refresh token (the system broker refreshes before expiry)"
        } else if *grant == crate::oauth::GrantUsed::ClientCredentials {
            " (renewed with the client credentials)"
        } else {
            " (no refresh token: log in again when it expires)"
        }
    ))
}

/// Revoke a login's tokens at the provider (from the broker: they never leave it) and remove
/// the row, with the tokens of a refresh that ran meanwhile revoked too (see
/// [`crate::oauth::logout`]). A failed revocation still removes it, and says so.
pub(super) fn logout(
    proxy: &Proxy,
    admin: &AdminContext,
    vault: &Vault,
    peer: ControlPeer,
    provider: &str,
    profile: &str,
) -> AdminReply {
    let upstream = &admin.upstream;
    let private = proxy
        .catalog()
        .get(provider)
        .is_some_and(|p| p.private_addresses);
    let report = match logout::logout(vault, provider, profile, |cred| {
        crate::oauth::refresh::run_blocking(async {
            let client = EndpointClient::new(upstream.clone(), private);
            revoke_login(&client, cred).await
        })
    }) {
        Ok(report) => report,
        Err(LogoutError::NotLoggedIn) => {
            return AdminReply::error(format!(
                "the system broker is not logged in to {} (profile {profile}): see `broker list --system`",
                if provider.len() > 32 { "(not shown)" } else { provider }
            ))
        }
        Err(LogoutError::NotALogin) => {
            return AdminReply::error(format!(
                "{provider} (profile {profile}) holds an API key in the system broker, not a login: remove it with `broker remove {provider} --system`"
            ))
        }
        Err(LogoutError::Vault(err)) => return AdminReply::error(err.to_string()),
    };
    audit_change(
        proxy,
        peer,
        EventKind::Logout,
        (provider, profile),
        "broker logout --system",
        report.audit_reason(),
    );
    let revoked = report.revoked_lines(provider).join(" ");
    let ending = report.ending_line(provider, profile, true);
    match report.failure_note() {
        None => AdminReply::ok(format!("{revoked} {ending}").trim().to_string()),
        Some(note) => {
            AdminReply::error(format!("{revoked} {ending} But {note}").trim().to_string())
        }
    }
}
