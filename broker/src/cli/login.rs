//! `broker login | logout`: OAuth logins whose tokens live in the vault (see `crate::oauth`);
//! with `--system`, in the system broker's ([`super::login_system`]).
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
use crate::oauth::logout::{self, LogoutError};
use crate::oauth::revoke::revoke_login;
use crate::oauth::{expiry_from_now, GrantUsed, OAuthSettings, TokenMeta, TokenSet, UserConfig};
use crate::providers::Catalog;
use crate::vault::{PutOutcome, TokenUpdate, Vault};

#[derive(Debug, Args)]
#[command(
    after_help = "Where the OAuth client id comes from, first found: --client-id, \
[oauth.<provider>] client_id in $BROKER_HOME/config.toml, the provider definition. \
Endpoints can be overridden in the same table, or a whole provider with an [oauth] table \
can be put in $BROKER_HOME/providers/.\n\
A confidential client's secret is read from stdin (or a no-echo prompt) and stored sealed \
in the vault; never pass it as an argument.\n\
With --system (root or an admin of the system broker): the client id and endpoints are the \
system broker's ([oauth.<provider>] in /etc/broker/config.toml, root's provider files); the \
login runs here and the tokens go to the system broker over its control socket. --client-id \
is refused with --system."
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
    /// Log the system broker in (`broker serve --system`), with its own OAuth settings: as
    /// root or an admin uid. The tokens go to it over its control socket.
    #[arg(long)]
    pub system: bool,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    pub provider: String,
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Log the system broker out (it revokes the tokens and removes them): as root or an
    /// admin uid.
    #[arg(long)]
    pub system: bool,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

pub fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    if args.system {
        return super::login_system::login(args);
    }
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
    let scopes = scopes(&args);
    let config = UserConfig::load(&home)?;
    let settings = OAuthSettings::resolve(
        provider,
        &config,
        args.client_id.as_deref(),
        scopes.as_deref(),
    )?;
    let command = format!("broker login {}", settings.provider);
    let grant = settings.choose_grant(args.device, &command)?;

    // Open the vault first: a locked vault should fail before the user spends time in a browser.
    let vault = Vault::open(&home)?;
    let client_secret = if settings.confidential() {
        let stored = || -> anyhow::Result<Option<Zeroizing<String>>> {
            Ok(vault
                .get_full(&settings.provider, &args.profile)?
                .and_then(|c| c.client_secret)
                .map(|s| Zeroizing::new(s.expose().to_string())))
        };
        Some(client_secret(&settings, &stored, &command)?)
    } else {
        None
    };
    let interaction = Interaction {
        open_browser: !args.no_browser,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let tokens = run_grant(
        &settings,
        grant,
        client_secret.as_ref().map(|s| s.as_str()),
        &interaction,
        args.upstream.into_settings(Some(&home))?,
    )?;

    let meta = TokenMeta::for_login(&settings, grant);
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
        Some(grant.describe().to_string()),
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

/// The `--scopes` asked for, each comma- or space-separated.
pub(super) fn scopes(args: &LoginArgs) -> Option<Vec<String>> {
    args.scopes.as_ref().map(|list| {
        list.iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_string)
            .collect()
    })
}

/// Run `grant` here (a browser, a device code, or the client credentials) and return the
/// tokens the token endpoint answered.
pub(super) fn run_grant(
    settings: &OAuthSettings,
    grant: GrantUsed,
    client_secret: Option<&str>,
    interaction: &Interaction,
    upstream: crate::proxy::UpstreamSettings,
) -> anyhow::Result<TokenSet> {
    let creds = ClientCredentials {
        client_id: &settings.client_id,
        auth: settings.client_auth,
        secret: client_secret,
    };
    let client = EndpointClient::new(upstream, settings.private_addresses);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tokens = runtime.block_on(async {
        match grant {
            GrantUsed::AuthorizationCode => {
                flows::authorization_code(settings, &client, &creds, interaction).await
            }
            GrantUsed::DeviceCode => {
                flows::device_code(settings, &client, &creds, interaction).await
            }
            GrantUsed::ClientCredentials => {
                flows::client_credentials(settings, &client, &creds).await
            }
        }
    });
    tokens.with_context(|| format!("login to {} failed", settings.display_name))
}

pub fn logout(args: LogoutArgs) -> anyhow::Result<ExitCode> {
    if args.system {
        return super::login_system::logout(args);
    }
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
    // A provider file that no longer loads leaves the SSRF guard on.
    let private = Catalog::load(&home)
        .ok()
        .and_then(|c| c.get(&args.provider).map(|p| p.private_addresses))
        .unwrap_or(false);
    let client = EndpointClient::new(args.upstream.into_settings(Some(&home))?, private);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = match logout::logout(&vault, &args.provider, &args.profile, |cred| {
        runtime.block_on(revoke_login(&client, cred))
    }) {
        Ok(report) => report,
        Err(LogoutError::NotLoggedIn) => bail!("{}", missing()),
        Err(LogoutError::NotALogin) => bail!(
            "{} (profile {}) holds an API key, not a login: remove it with `broker remove {}`",
            args.provider,
            args.profile,
            args.provider
        ),
        Err(LogoutError::Vault(err)) => return Err(err.into()),
    };
    for line in report.revoked_lines(&args.provider) {
        eprintln!("{line}");
    }
    audit(
        &home,
        &vault,
        EventKind::Logout,
        &args.provider,
        &args.profile,
        "broker logout",
        report.audit_reason(),
    );
    eprintln!(
        "{}",
        report.ending_line(&args.provider, &args.profile, false)
    );
    if let Some(note) = report.failure_note() {
        bail!("{note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A confidential client's secret: from stdin when it is not a terminal, else the one stored
/// with an earlier login (`stored`), else a no-echo prompt. `command` is the login's, for the
/// message when none was given.
pub(super) fn client_secret(
    settings: &OAuthSettings,
    stored: &dyn Fn() -> anyhow::Result<Option<Zeroizing<String>>>,
    command: &str,
) -> anyhow::Result<Zeroizing<String>> {
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
             `pass show {}-oauth | {command}`",
            settings.display_name,
            settings.provider
        );
    }
    Ok(secret)
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
