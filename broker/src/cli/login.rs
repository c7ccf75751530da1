//! `broker login | logout`: OAuth logins whose tokens live in the vault (see `crate::oauth`).
//!
//! Nothing secret is taken from argv or printed: tokens go from the token endpoint straight
//! into the vault, a confidential client's secret is read from stdin or a no-echo prompt.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use zeroize::Zeroizing;

use super::UpstreamArgs;
use crate::audit::{Audit, AuditEvent, EventKind};
use crate::home::Home;
use crate::oauth::client::{ClientCredentials, EndpointClient};
use crate::oauth::flows::{self, Interaction};
use crate::oauth::{expiry_from_now, GrantUsed, OAuthSettings, TokenMeta, UserConfig};
use crate::providers::{Catalog, Grant};
use crate::vault::{CredentialKind, PutOutcome, TokenUpdate, Vault};

#[derive(Debug, Args)]
#[command(
    after_help = "Where the OAuth client id comes from, first found: --client-id, \
[oauth.<provider>] client_id in $BROKER_HOME/config.toml, the provider definition. \
Endpoints can be overridden in the same table, or a whole provider with an [oauth] table \
can be put in $BROKER_HOME/providers/.\n\
A confidential client's secret is read from stdin (or a no-echo prompt) and stored sealed \
in the vault; never pass it as an argument."
)]
pub struct LoginArgs {
    /// Provider name (see `broker providers`).
    pub provider: String,
    /// Use the device flow (RFC 8628): a code to enter on another device. For SSH and CI.
    #[arg(long)]
    pub device: bool,
    /// Profile name, to keep several logins for one provider.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// OAuth client id (overrides config.toml and the provider definition).
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// Scopes to ask for, comma- or space-separated (default: the provider's).
    #[arg(long, value_name = "SCOPES", value_delimiter = ',')]
    pub scopes: Option<Vec<String>>,
    /// Give up after this many seconds without an answer.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub timeout: u64,
    /// Print the login URL instead of opening a browser.
    #[arg(long)]
    pub no_browser: bool,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    pub provider: String,
    #[arg(long, default_value = "default")]
    pub profile: String,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

pub fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let home = home()?;
    let catalog = Catalog::load(&home)?;
    let Some(provider) = catalog.get(&args.provider) else {
        bail!(
            "unknown provider {:?}: see `broker providers`, or add one with an [oauth] table in \
             $BROKER_HOME/providers/",
            args.provider.chars().take(32).collect::<String>()
        );
    };
    crate::vault::check_name("profile", &args.profile)?;
    let scopes: Option<Vec<String>> = args.scopes.as_ref().map(|list| {
        list.iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_string)
            .collect()
    });
    let config = UserConfig::load(&home)?;
    let settings = OAuthSettings::resolve(
        provider,
        &config,
        args.client_id.as_deref(),
        scopes.as_deref(),
    )?;
    let grant = if settings.grant == Grant::ClientCredentials {
        GrantUsed::ClientCredentials
    } else if args.device || (settings.authorize_url.is_none() && settings.device_url.is_some()) {
        if settings.device_url.is_none() {
            bail!(
                "{} does not support the device flow: run `broker login {}` without --device",
                settings.display_name,
                settings.provider
            );
        }
        GrantUsed::DeviceCode
    } else {
        GrantUsed::AuthorizationCode
    };

    // Open the vault first: a locked vault should fail before the user spends time in a browser.
    let vault = Vault::open(&home)?;
    let client_secret = if settings.confidential() {
        Some(client_secret(&vault, &settings, &args.profile)?)
    } else {
        None
    };
    let creds = ClientCredentials {
        client_id: &settings.client_id,
        auth: settings.client_auth,
        secret: client_secret.as_ref().map(|s| s.as_str()),
    };
    let interaction = Interaction {
        open_browser: !args.no_browser,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let client = EndpointClient::new(
        args.upstream.into_settings(Some(&home))?,
        provider.private_addresses,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tokens = runtime.block_on(async {
        match grant {
            GrantUsed::AuthorizationCode => {
                flows::authorization_code(&settings, &client, &creds, &interaction).await
            }
            GrantUsed::DeviceCode => {
                flows::device_code(&settings, &client, &creds, &interaction).await
            }
            GrantUsed::ClientCredentials => {
                flows::client_credentials(&settings, &client, &creds).await
            }
        }
    });
    let tokens = tokens.with_context(|| format!("login to {} failed", settings.display_name))?;

    let meta = TokenMeta {
        token_url: settings.token_url.clone(),
        revoke_url: settings.revoke_url.clone(),
        client_id: settings.client_id.clone(),
        client_auth: settings.client_auth,
        scopes: settings.scopes.clone(),
        grant,
        login_expired: false,
    };
    let outcome = vault.put_oauth(
        &settings.provider,
        &args.profile,
        &TokenUpdate {
            access: &tokens.access_token,
            refresh: tokens.refresh_token.as_ref().map(|r| r.as_str()),
            expires_at: tokens.expires_in.map(expiry_from_now),
            metadata: &meta.to_json(),
        },
        client_secret.as_ref().map(|s| s.as_str()),
    )?;
    super::providers::accept_on_store(&home, &vault, provider, "broker login")?;
    audit(
        &home,
        &vault,
        EventKind::Login,
        &settings.provider,
        &args.profile,
        "broker login",
        Some(grant_name(grant).to_string()),
    );
    eprintln!(
        "Logged in to {} (profile {}); {} the tokens in {}: access token{}{}.",
        settings.display_name,
        args.profile,
        match outcome {
            PutOutcome::Added => "stored",
            PutOutcome::Replaced => "replaced",
        },
        vault.path().display(),
        tokens
            .expires_in
            .map(|s| format!(" (expires in {s} s)"))
            .unwrap_or_default(),
        if tokens.refresh_token.is_some() {
            ", refresh token (broker refreshes before expiry)"
        } else if grant == GrantUsed::ClientCredentials {
            " (renewed with the client credentials)"
        } else {
            " (no refresh token: log in again when it expires)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn logout(args: LogoutArgs) -> anyhow::Result<ExitCode> {
    let home = home()?;
    let missing = || {
        format!(
            "not logged in to {} (profile {}): see `broker list`",
            args.provider.chars().take(32).collect::<String>(),
            args.profile
        )
    };
    if !Vault::exists(&home) {
        bail!("{}", missing());
    }
    let vault = Vault::open(&home)?;
    let Some(cred) = vault.get_full(&args.provider, &args.profile)? else {
        bail!("{}", missing());
    };
    if cred.kind != CredentialKind::OAuth2 {
        bail!(
            "{} (profile {}) holds an API key, not a login: remove it with `broker remove {}`",
            args.provider,
            args.profile,
            args.provider
        );
    }
    let meta = TokenMeta::from_json(&cred.metadata);
    let mut failures = Vec::new();
    let revoke_url = meta.as_ref().and_then(|m| m.revoke_url.clone());
    match (&meta, &revoke_url) {
        (Some(meta), Some(url)) => {
            // A provider file that no longer loads leaves the guard on.
            let private = Catalog::load(&home)
                .ok()
                .and_then(|c| c.get(&args.provider).map(|p| p.private_addresses))
                .unwrap_or(false);
            let client = EndpointClient::new(args.upstream.into_settings(Some(&home))?, private);
            let creds = ClientCredentials {
                client_id: &meta.client_id,
                auth: meta.client_auth,
                secret: cred.client_secret.as_ref().map(|s| s.expose()),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // The refresh token first: revoking it usually ends the whole grant.
            let tokens = [
                ("refresh token", "refresh_token", cred.refresh.as_ref()),
                ("access token", "access_token", Some(&cred.secret)),
            ];
            for (what, hint, token) in tokens {
                let Some(token) = token else { continue };
                let result = runtime.block_on(client.post_form(
                    url,
                    &[("token", token.expose()), ("token_type_hint", hint)],
                    &creds,
                ));
                // The server's error text may quote what it was sent: redacted.
                let secrets = cred.secret_bytes();
                let redacted = |text: String| crate::proxy::redact_text(text.as_bytes(), &secrets);
                match result {
                    // RFC 7009 2.2: 200 whether or not the token was still valid.
                    Ok(answer) if answer.status == 200 => eprintln!("Revoked the {what}."),
                    Ok(answer) => failures.push(format!(
                        "the {what}: {}",
                        redacted(
                            crate::oauth::client::oauth_error(&answer)
                                .map(|e| e.to_string())
                                .unwrap_or_else(|| format!("{url} answered {}", answer.status))
                        )
                    )),
                    Err(err) => failures.push(format!("the {what}: {}", redacted(err.to_string()))),
                }
            }
        }
        _ => eprintln!(
            "{} has no revocation endpoint: the tokens stay valid at the server until they \
             expire (revoke the app's access in your account settings to end them now).",
            args.provider
        ),
    }
    vault.remove(&args.provider, &args.profile)?;
    audit(
        &home,
        &vault,
        EventKind::Logout,
        &args.provider,
        &args.profile,
        "broker logout",
        (!failures.is_empty()).then(|| "revocation failed".to_string()),
    );
    eprintln!(
        "Logged out of {} (profile {}): the tokens were removed from the vault.",
        args.provider, args.profile
    );
    if !failures.is_empty() {
        bail!(
            "revocation failed for {} (removed locally anyway; the tokens may stay valid at the \
             server until they expire)",
            failures.join("; ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A confidential client's secret: from stdin when it is not a terminal, else the one stored
/// with an earlier login, else a no-echo prompt.
fn client_secret(
    vault: &Vault,
    settings: &OAuthSettings,
    profile: &str,
) -> anyhow::Result<Zeroizing<String>> {
    let stored = || -> anyhow::Result<Option<Zeroizing<String>>> {
        Ok(vault
            .get_full(&settings.provider, profile)?
            .and_then(|c| c.client_secret)
            .map(|s| Zeroizing::new(s.expose().to_string())))
    };
    if std::io::stdin().is_terminal() {
        if let Some(s) = stored()? {
            eprintln!("Using the client secret stored with the last login.");
            return Ok(s);
        }
    }
    let prompt = format!(
        "OAuth client secret for {} (client id {}, input hidden): ",
        settings.display_name, settings.client_id
    );
    let mut secret = super::credentials::read_hidden(&prompt, "the client secret")?;
    while secret.ends_with(['\n', '\r']) {
        secret.pop();
    }
    if secret.is_empty() {
        if let Some(s) = stored()? {
            return Ok(s);
        }
        bail!(
            "{} uses a confidential OAuth client: pipe its client secret on stdin, e.g. \
             `pass show {p}-oauth | broker login {p}`",
            settings.display_name,
            p = settings.provider
        );
    }
    Ok(secret)
}

fn grant_name(grant: GrantUsed) -> &'static str {
    match grant {
        GrantUsed::AuthorizationCode => "authorization code with PKCE",
        GrantUsed::DeviceCode => "device code",
        GrantUsed::ClientCredentials => "client credentials",
    }
}

fn audit(
    home: &Home,
    vault: &Vault,
    kind: EventKind,
    provider: &str,
    profile: &str,
    command: &str,
    reason: Option<String>,
) {
    let event = AuditEvent {
        provider: Some(provider.to_string()),
        profile: Some(profile.to_string()),
        pid: Some(std::process::id()),
        command: Some(command.to_string()),
        reason,
        ..AuditEvent::new(kind)
    };
    if let Err(err) = Audit::open(home, vault).and_then(|a| a.append(event)) {
        eprintln!("broker: warning: {err}");
    }
}

fn home() -> anyhow::Result<Home> {
    let home = Home::from_env().context("cannot locate BROKER_HOME")?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    Ok(home)
}
