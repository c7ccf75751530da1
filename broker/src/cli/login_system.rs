//! `broker login | logout --system`: OAuth logins of the system broker, from root or an admin
//! uid. The settings come from the broker (its root-owned config and provider files); the
//! grant runs here, where the admin and their browser are (as `broker login` does); the tokens
//! (and a confidential client's secret) go to the broker over its control socket, in buffers
//! zeroized after use, never in argv and never printed. The broker's side, and why the
//! endpoints it stores are its own: `crate::system::admin_login`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;

use super::credentials::{printable_name, system_request};
use super::login::{client_secret, run_grant, scopes, LoginArgs, LogoutArgs};
use crate::oauth::flows::Interaction;
use crate::system::admin::{AdminReply, AdminRequest};

pub fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let provider = printable_name(&args.provider);
    // The client is root's choice, like the endpoints: it is the app registration the IdP
    // applies its consent, scopes and policies to, and the one the broker refreshes as.
    if args.client_id.is_some() {
        bail!(
            "--client-id is refused with --system: the system broker's OAuth client is root's \
             to choose, like its endpoints (it is the app registration whose consent and \
             policies the broker's logins get). Root sets it in /etc/broker/config.toml and \
             restarts the broker:\n  [oauth.{provider}]\n  client_id = \"...\""
        );
    }
    crate::vault::check_name("profile", &args.profile)?;
    let scopes = scopes(&args);
    let asked = AdminRequest::OauthSettings {
        provider: args.provider.clone(),
        scopes: scopes.clone(),
    };
    let settings = match system_request(&asked)? {
        AdminReply::Ok {
            oauth: Some(settings),
            ..
        } => *settings,
        AdminReply::Ok { .. } => bail!(
            "the system broker answered without OAuth settings: is it an older version? Restart it with this one"
        ),
        AdminReply::Error { error } => bail!("the system broker refused: {error}"),
    };
    settings.check_endpoints()?;
    let command = format!("broker login {provider} --system");
    let grant = settings.choose_grant(args.device, &command)?;
    // Never the stored one: the broker returns no secret, not even to an admin.
    let mut secret = if settings.confidential() {
        Some(client_secret(&settings, &|| Ok(None), &command)?)
    } else {
        None
    };
    let interaction = Interaction {
        open_browser: !args.no_browser,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    // The admin's $BROKER_HOME plays no part: no upstream proxy from it either.
    let mut tokens = run_grant(
        &settings,
        grant,
        secret.as_ref().map(|s| s.as_str()),
        &interaction,
        args.upstream.into_settings(None)?,
    )?;
    // Moved, not copied, into the request, which zeroizes them when dropped.
    let request = AdminRequest::Login {
        provider: settings.provider.clone(),
        profile: args.profile.clone(),
        grant,
        scopes,
        access_token: std::mem::take(&mut *tokens.access_token),
        refresh_token: tokens
            .refresh_token
            .as_mut()
            .map(|r| std::mem::take(&mut **r)),
        expires_in: tokens.expires_in,
        client_secret: secret.as_mut().map(|s| std::mem::take(&mut **s)),
    };
    drop(tokens);
    drop(secret);
    let reply = system_request(&request);
    drop(request);
    match reply? {
        AdminReply::Ok { message, .. } => {
            eprintln!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        AdminReply::Error { error } => bail!(
            "the system broker refused the login: {error}. This command kept no token: run the login again once that is fixed (`broker list --system` shows what the system broker holds)"
        ),
    }
}

pub fn logout(args: LogoutArgs) -> anyhow::Result<ExitCode> {
    crate::vault::check_name("profile", &args.profile)?;
    let request = AdminRequest::Logout {
        provider: args.provider.clone(),
        profile: args.profile.clone(),
    };
    match system_request(&request)? {
        AdminReply::Ok { message, .. } => {
            eprintln!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        // Whole sentences: a refusal (who may), or a logout whose revocation failed.
        AdminReply::Error { error } => bail!("{error}"),
    }
}
