//! Administration of the system broker over its control socket: `broker add | remove | list
//! --system` from an admin uid. The request is the magic line and one JSON line; the answer
//! one JSON line. A key travels only towards the broker (read by the CLI from stdin or a
//! no-echo prompt, never argv); no answer ever holds one, not even masked.
//!
//! Who may: the uids the access list names as admins (and root), by `SO_PEERCRED`. What an
//! admin can do to keys is add, replace and remove them: denial of service, never theft.
//!
//! OAuth logins (`broker login | logout --system`, [`super::admin_login`]): the CLI asks for
//! the public settings (`oauth_settings`: endpoints, client id, scopes, resolved from root's
//! config and provider files), runs the grant itself, and sends the tokens (`login`) for the
//! broker to store under its own settings; `logout` revokes and removes, in the broker.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, EventKind};
use crate::control::ControlPeer;
use crate::home::Home;
use crate::oauth::{GrantUsed, OAuthSettings, UserConfig};
use crate::proxy::{Proxy, UpstreamSettings};
use crate::system::access::Role;
use crate::vault::{CredentialInfo, CredentialKind, KeyConfig, PutOutcome, Vault};

/// First line of an admin request; the number is the format version.
pub const ADMIN_MAGIC: &str = "broker-admin 1";
/// Longest an admin request may take to answer (a vault write, under a busy timeout).
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the daemon needs to change its vault.
#[derive(Clone)]
pub struct AdminContext {
    pub home: Home,
    pub keys: KeyConfig,
    /// `[oauth.<provider>]` of root's config: the settings of `broker login --system`.
    pub oauth: UserConfig,
    /// How the broker reaches token and revocation endpoints (as it reaches providers).
    pub upstream: UpstreamSettings,
}

/// One admin request. `Debug` never prints a secret; every secret is zeroized on drop.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Add {
        provider: String,
        profile: String,
        secret: String,
        /// Store a secret that does not match the provider's key format.
        #[serde(default)]
        force: bool,
    },
    Remove {
        provider: String,
        profile: String,
    },
    List,
    /// What the asking uid may do (`user`, `admin` or `refused`): for `broker doctor`. Any
    /// uid may ask about itself.
    Whoami,
    /// The public OAuth settings of `provider` for `broker login --system`: endpoints, client
    /// id, scopes (`scopes` instead of the configured ones, as `--scopes` asks). Never a
    /// client secret (the settings hold none).
    OauthSettings {
        provider: String,
        #[serde(default)]
        scopes: Option<Vec<String>>,
    },
    /// The tokens an admin's `broker login --system` got, for the broker to store. The
    /// endpoints and client id stored with them are the broker's own, resolved again here.
    Login {
        provider: String,
        profile: String,
        /// The grant the CLI ran.
        grant: GrantUsed,
        /// The scopes it asked for (`None`: the configured ones).
        #[serde(default)]
        scopes: Option<Vec<String>>,
        access_token: String,
        #[serde(default)]
        refresh_token: Option<String>,
        /// Seconds, as the token endpoint said.
        #[serde(default)]
        expires_in: Option<u64>,
        /// A confidential client's secret (stored sealed with the tokens, for refreshes).
        #[serde(default)]
        client_secret: Option<String>,
    },
    /// Revoke a login's tokens at the provider (where it has an endpoint) and remove it.
    Logout {
        provider: String,
        profile: String,
    },
}

impl AdminRequest {
    /// Overwrite every secret the request holds (what `Drop` does).
    pub fn wipe(&mut self) {
        use zeroize::Zeroize as _;
        match self {
            AdminRequest::Add { secret, .. } => secret.zeroize(),
            AdminRequest::Login {
                access_token,
                refresh_token,
                client_secret,
                ..
            } => {
                access_token.zeroize();
                refresh_token.zeroize();
                client_secret.zeroize();
            }
            _ => {}
        }
    }

    /// Does the request change the vault (and so the placeholders bare preloads get)?
    fn changes_vault(&self) -> bool {
        matches!(
            self,
            AdminRequest::Add { .. }
                | AdminRequest::Remove { .. }
                | AdminRequest::Login { .. }
                | AdminRequest::Logout { .. }
        )
    }
}

impl Drop for AdminRequest {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl std::fmt::Debug for AdminRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HIDDEN: &str = "(hidden)";
        let hidden = |s: &Option<String>| s.as_ref().map(|_| HIDDEN);
        match self {
            AdminRequest::Add {
                provider,
                profile,
                force,
                ..
            } => f
                .debug_struct("Add")
                .field("provider", provider)
                .field("profile", profile)
                .field("secret", &HIDDEN)
                .field("force", force)
                .finish(),
            AdminRequest::Remove { provider, profile } => f
                .debug_struct("Remove")
                .field("provider", provider)
                .field("profile", profile)
                .finish(),
            AdminRequest::List => f.write_str("List"),
            AdminRequest::Whoami => f.write_str("Whoami"),
            AdminRequest::OauthSettings { provider, scopes } => f
                .debug_struct("OauthSettings")
                .field("provider", provider)
                .field("scopes", scopes)
                .finish(),
            AdminRequest::Login {
                provider,
                profile,
                grant,
                scopes,
                refresh_token,
                expires_in,
                client_secret,
                ..
            } => f
                .debug_struct("Login")
                .field("provider", provider)
                .field("profile", profile)
                .field("grant", grant)
                .field("scopes", scopes)
                .field("access_token", &HIDDEN)
                .field("refresh_token", &hidden(refresh_token))
                .field("expires_in", expires_in)
                .field("client_secret", &hidden(client_secret))
                .finish(),
            AdminRequest::Logout { provider, profile } => f
                .debug_struct("Logout")
                .field("provider", provider)
                .field("profile", profile)
                .finish(),
        }
    }
}

/// The answer. Never holds a secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminReply {
    Ok {
        message: String,
        #[serde(default)]
        credentials: Vec<CredentialInfo>,
        /// The answer to `oauth_settings` (public: no secret in them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oauth: Option<Box<OAuthSettings>>,
    },
    Error {
        error: String,
    },
}

impl AdminReply {
    pub fn error(error: impl Into<String>) -> AdminReply {
        AdminReply::Error {
            error: error.into(),
        }
    }

    pub(super) fn ok(message: impl Into<String>) -> AdminReply {
        AdminReply::Ok {
            message: message.into(),
            credentials: Vec::new(),
            oauth: None,
        }
    }

    /// The reply line.
    pub fn render(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        out.push(b'\n');
        out
    }
}

/// Answer one admin request line from `peer`.
pub(crate) async fn answer(
    proxy: &Arc<Proxy>,
    admin: Option<&AdminContext>,
    peer: ControlPeer,
    line: &str,
) -> AdminReply {
    let (Some(admin), Some(access)) = (admin, proxy.access()) else {
        return AdminReply::error(
            "this broker takes no admin requests: only the system broker (`broker serve --system`) does; use `broker add` without --system for your own",
        );
    };
    let request = match serde_json::from_str::<AdminRequest>(line) {
        Ok(request) => request,
        // Names no part of the line: it may hold a key.
        Err(_) => return AdminReply::error("malformed admin request"),
    };
    if matches!(request, AdminRequest::Whoami) {
        return AdminReply::ok(match peer.role {
            Some(Role::Admin) => "admin",
            Some(Role::User) => "user",
            None => "refused",
        });
    }
    // Asking for the OAuth settings is how a login starts: refused and audited like one.
    let changes = !matches!(request, AdminRequest::List);
    if peer.role != Some(Role::Admin) {
        let why = format!(
            "uid {} is not an administrator of the system broker: admins are root and [access] admin_users/admin_groups in /etc/broker/config.toml",
            peer.uid
        );
        if changes && access.audit_refusal(peer.uid).is_some() {
            proxy.audit().record(AuditEvent {
                uid: Some(peer.uid),
                pid: peer.pid,
                reason: Some(why.clone()),
                ..AuditEvent::new(EventKind::AdminRefused)
            });
        }
        return AdminReply::error(why);
    }
    let applying = proxy.clone();
    let admin = admin.clone();
    let changes_vault = request.changes_vault();
    let reply = tokio::task::spawn_blocking(move || apply(&applying, &admin, peer, request))
        .await
        .unwrap_or_else(|_| AdminReply::error("the admin request crashed; see the broker's log"));
    // A key added or removed changes which placeholders bare preloads get: the config says
    // so before the admin hears back, so an agent started right after sees it.
    if changes_vault {
        crate::instance::refresh_placeholders(proxy).await;
    }
    reply
}

/// Carry out an admin's request on the vault (blocking).
fn apply(
    proxy: &Proxy,
    admin: &AdminContext,
    peer: ControlPeer,
    request: AdminRequest,
) -> AdminReply {
    if let AdminRequest::OauthSettings { provider, scopes } = &request {
        return super::admin_login::settings(proxy, admin, provider, scopes.as_deref());
    }
    let vault = match Vault::open_with(&admin.home, &admin.keys) {
        Ok(vault) => vault,
        Err(err) => return AdminReply::error(format!("cannot open the vault: {err}")),
    };
    let audit = |kind: EventKind, provider: &str, profile: &str, command: &str| {
        audit_change(proxy, peer, kind, (provider, profile), command, None);
    };
    match &request {
        AdminRequest::Whoami | AdminRequest::OauthSettings { .. } => {
            AdminReply::error("answered above")
        }
        AdminRequest::Login { .. } => super::admin_login::store(proxy, admin, &vault, peer, &request),
        AdminRequest::Logout { provider, profile } => {
            super::admin_login::logout(proxy, admin, &vault, peer, provider, profile)
        }
        AdminRequest::List => match vault.list() {
            Ok(credentials) => AdminReply::Ok {
                message: String::new(),
                credentials,
                oauth: None,
            },
            Err(err) => AdminReply::error(err.to_string()),
        },
        AdminRequest::Remove { provider, profile } => match vault.remove(provider, profile) {
            Ok(true) => {
                audit(EventKind::CredentialRemoved, provider, profile, "broker remove --system");
                AdminReply::ok(format!("removed the {provider} credential (profile {profile}) from the system broker"))
            }
            Ok(false) => AdminReply::error(format!(
                "no credential for {provider} (profile {profile}) in the system broker: see `broker list --system`"
            )),
            Err(err) => AdminReply::error(err.to_string()),
        },
        AdminRequest::Add {
            provider,
            profile,
            secret,
            force,
        } => {
            let found = match known_provider(proxy, provider, Some(profile)) {
                Ok(found) => found,
                Err(refused) => return refused,
            };
            if found.is_placeholder(secret) {
                return AdminReply::error(format!(
                    "that is broker's placeholder for {provider}, not a real key"
                ));
            }
            if !force && !found.key_matches(secret) {
                return AdminReply::error(format!(
                    "this does not look like a key for {} (expected the pattern {}); nothing was stored. Check for a copy-paste slip, or pass --force",
                    found.display_name, found.key_pattern
                ));
            }
            let outcome = match vault.put(provider, profile, secret, CredentialKind::ApiKey) {
                Ok(outcome) => outcome,
                Err(err) => return AdminReply::error(err.to_string()),
            };
            // The hosts of the definition in effect (root's) are the ones accepted for it.
            let grants = crate::providers::trust::grants(found);
            if let Err(err) = vault.set_trusted_grants(provider, &grants) {
                return AdminReply::error(err.to_string());
            }
            audit(EventKind::CredentialAdded, provider, profile, "broker add --system");
            let verb = match outcome {
                PutOutcome::Added => "stored",
                PutOutcome::Replaced => "replaced",
            };
            AdminReply::ok(format!(
                "{verb} the {} key (profile {profile}) in the system broker",
                found.display_name
            ))
        }
    }
}

/// The provider of the broker's own catalog (built-ins and root's files) named `provider`,
/// with `profile` checked; or the refusal to answer.
pub(super) fn known_provider<'a>(
    proxy: &'a Proxy,
    provider: &str,
    profile: Option<&str>,
) -> Result<&'a crate::providers::Provider, AdminReply> {
    let Some(found) = proxy.catalog().get(provider) else {
        return Err(AdminReply::error(format!(
            "unknown provider '{}' (see `broker providers`; the system broker knows the built-ins and /etc/broker/providers)",
            if provider.len() > 32 { "(not shown)" } else { provider }
        )));
    };
    if let Some(profile) = profile {
        crate::vault::check_name("profile", profile)
            .map_err(|e| AdminReply::error(e.to_string()))?;
    }
    Ok(found)
}

/// Audit a change an admin made, with the admin's uid and pid (from the kernel).
pub(super) fn audit_change(
    proxy: &Proxy,
    peer: ControlPeer,
    kind: EventKind,
    (provider, profile): (&str, &str),
    command: &str,
    reason: Option<String>,
) {
    proxy.audit().record(AuditEvent {
        uid: Some(peer.uid),
        pid: peer.pid,
        provider: Some(provider.to_string()),
        profile: Some(profile.to_string()),
        command: Some(command.to_string()),
        reason,
        ..AuditEvent::new(kind)
    });
}

/// Send `request` to the system broker at `socket` and return its answer.
pub fn request(socket: &Path, request: &AdminRequest) -> anyhow::Result<AdminReply> {
    use anyhow::Context as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the system broker at {} (is `broker serve --system` running? `systemctl status broker`)",
            socket.display()
        )
    })?;
    check_server(&stream, socket)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = Zeroizing::new(format!("{ADMIN_MAGIC}\n").into_bytes());
    line.extend_from_slice(&Zeroizing::new(serde_json::to_vec(request)?));
    line.push(b'\n');
    stream.write_all(&line)?;
    drop(line);
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|_| {
        anyhow::anyhow!(
            "the process at {} answered something that is not the system broker's answer",
            socket.display()
        )
    })
}

/// The key goes only to the system broker: the socket's owner (by `SO_PEERCRED`) must own
/// its directory, which must pass [`super::ownership::system_broker_uid`] (made by root
/// for the broker's user), or be root.
fn check_server(stream: &std::os::unix::net::UnixStream, socket: &Path) -> anyhow::Result<()> {
    let dir = socket.parent().map(Path::to_path_buf).unwrap_or_default();
    let expected = super::ownership::system_broker_uid(&dir)?;
    let cred = rustix::net::sockopt::socket_peercred(stream)?;
    let uid = cred.uid.as_raw();
    if uid != expected && uid != 0 {
        anyhow::bail!(
            "the process at {} runs as uid {uid}, not as the system broker's user (uid {expected}): nothing was sent",
            socket.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGIN: &str = r#"{"op":"login","provider":"acme","profile":"default","grant":"device_code","access_token":"at-secret-0123456789","refresh_token":"rt-secret-0123456789","expires_in":60,"client_secret":"cs-secret-0123456789"}"#;
    const SECRETS: [&str; 3] = ["at-secret", "rt-secret", "cs-secret"];

    #[test]
    fn login_requests_parse_strictly_and_round_trip() {
        let request: AdminRequest = serde_json::from_str(LOGIN).expect("parses");
        let AdminRequest::Login {
            provider,
            grant,
            expires_in,
            scopes,
            refresh_token,
            ..
        } = &request
        else {
            panic!("not a login: {request:?}");
        };
        assert_eq!(provider, "acme");
        assert_eq!(*grant, GrantUsed::DeviceCode);
        assert_eq!((*expires_in, scopes.as_ref()), (Some(60), None));
        assert!(refresh_token.is_some());
        let again: AdminRequest =
            serde_json::from_slice(&serde_json::to_vec(&request).expect("json")).expect("again");
        assert_eq!(format!("{again:?}"), format!("{request:?}"));
        // Debug hides the tokens: the values themselves must survive the trip too.
        assert_eq!(
            serde_json::to_value(&again).expect("json"),
            serde_json::to_value(&request).expect("json")
        );

        // An admin cannot hand the broker endpoints or a client id: unknown fields are refused.
        for extra in [
            r#""token_url":"https://idp.evil.example/token","#,
            r#""revoke_url":"https://idp.evil.example/revoke","#,
            r#""client_id":"someone-elses-app","#,
        ] {
            let line = LOGIN.replace(r#""expires_in""#, &format!("{extra}\"expires_in\""));
            assert!(
                serde_json::from_str::<AdminRequest>(&line).is_err(),
                "{extra}"
            );
        }
        // The access token is required; an unknown grant is refused.
        assert!(serde_json::from_str::<AdminRequest>(
            r#"{"op":"login","provider":"acme","profile":"default","grant":"device_code"}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<AdminRequest>(&LOGIN.replace("device_code", "implicit"))
                .is_err()
        );

        let asked: AdminRequest =
            serde_json::from_str(r#"{"op":"oauth_settings","provider":"acme","scopes":["api"]}"#)
                .expect("settings op");
        assert!(
            matches!(&asked, AdminRequest::OauthSettings { scopes: Some(s), .. } if s == &["api"])
        );
        assert!(serde_json::from_str::<AdminRequest>(
            r#"{"op":"oauth_settings","provider":"acme","client_id":"x"}"#
        )
        .is_err());
        let logout: AdminRequest =
            serde_json::from_str(r#"{"op":"logout","provider":"acme","profile":"work"}"#)
                .expect("logout op");
        assert!(matches!(&logout, AdminRequest::Logout { profile, .. } if profile == "work"));
        assert!(logout.changes_vault() && request.changes_vault());
        assert!(!asked.changes_vault());
    }

    #[test]
    fn debug_never_prints_a_secret_and_wipe_overwrites_them() {
        let mut login: AdminRequest = serde_json::from_str(LOGIN).expect("parses");
        let shown = format!("{login:?}");
        assert!(
            shown.contains("acme") && shown.contains("(hidden)"),
            "{shown}"
        );
        for secret in SECRETS {
            assert!(!shown.contains(secret), "{shown}");
        }
        login.wipe();
        let AdminRequest::Login {
            access_token,
            refresh_token,
            client_secret,
            ..
        } = &login
        else {
            panic!("still a login");
        };
        assert!(access_token.is_empty());
        assert!(refresh_token.as_deref().is_none_or(str::is_empty));
        assert!(client_secret.as_deref().is_none_or(str::is_empty));
        let json = serde_json::to_string(&login).expect("json");
        for secret in SECRETS {
            assert!(!json.contains(secret), "{json}");
        }

        let mut add = AdminRequest::Add {
            provider: "openai".into(),
            profile: "default".into(),
            secret: "sk-test-add-secret-0123456789".into(),
            force: false,
        };
        assert!(!format!("{add:?}").contains("sk-test-add-secret"));
        add.wipe();
        assert!(matches!(&add, AdminRequest::Add { secret, .. } if secret.is_empty()));
    }

    #[test]
    fn the_settings_reply_holds_no_secret() {
        let settings = OAuthSettings {
            provider: "acme".into(),
            display_name: "ACME".into(),
            authorize_url: Some("https://idp.acme.example/authorize".into()),
            token_url: "https://idp.acme.example/token".into(),
            device_url: None,
            revoke_url: None,
            scopes: vec!["read".into()],
            client_id: "broker-app".into(),
            client_auth: crate::providers::ClientAuth::Basic,
            device_flow: false,
            grant: crate::providers::Grant::AuthorizationCode,
            private_addresses: false,
        };
        let reply = AdminReply::Ok {
            message: String::new(),
            credentials: Vec::new(),
            oauth: Some(Box::new(settings.clone())),
        };
        let line = String::from_utf8(reply.render()).expect("utf-8");
        assert!(!line.contains("secret"), "{line}");
        let back: AdminReply = serde_json::from_str(&line).expect("parses");
        assert!(matches!(back, AdminReply::Ok { oauth: Some(s), .. } if *s == settings));
        // Settings with a field this version does not know are refused, not half-read.
        let planted = line.replace(r#""client_id""#, r#""client_secret":"x","client_id""#);
        assert!(serde_json::from_str::<AdminReply>(&planted).is_err());
        // The older replies (no `oauth`) still parse.
        let list: AdminReply =
            serde_json::from_str(r#"{"result":"ok","message":"m","credentials":[]}"#)
                .expect("parses");
        assert!(matches!(list, AdminReply::Ok { oauth: None, .. }));
    }
}
