//! Administration of the system broker over its control socket: `broker add | remove | list
//! --system` from an admin uid. The request is the magic line and one JSON line; the answer
//! one JSON line. A key travels only towards the broker (read by the CLI from stdin or a
//! no-echo prompt, never argv); no answer ever holds one, not even masked.
//!
//! Who may: the uids the access list names as admins (and root), by `SO_PEERCRED`. What an
//! admin can do to keys is add, replace and remove them: denial of service, never theft.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, EventKind};
use crate::control::ControlPeer;
use crate::home::Home;
use crate::proxy::Proxy;
use crate::system::access::Role;
use crate::vault::{CredentialInfo, CredentialKind, KeyConfig, PutOutcome, Vault};

/// First line of an admin request; the number is the format version.
pub const ADMIN_MAGIC: &str = "broker-admin 1";
/// Longest an admin request may take to answer (a vault write, under a busy timeout).
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the daemon needs to change its vault.
pub struct AdminContext {
    pub home: Home,
    pub keys: KeyConfig,
}

/// One admin request.
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
}

impl Drop for AdminRequest {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        if let AdminRequest::Add { secret, .. } = self {
            secret.zeroize();
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

    fn ok(message: impl Into<String>) -> AdminReply {
        AdminReply::Ok {
            message: message.into(),
            credentials: Vec::new(),
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
    let (home, keys) = (admin.home.clone(), admin.keys.clone());
    let reply = tokio::task::spawn_blocking(move || apply(&applying, &home, &keys, peer, request))
        .await
        .unwrap_or_else(|_| AdminReply::error("the admin request crashed; see the broker's log"));
    // A key added or removed changes which placeholders bare preloads get: the config says
    // so before the admin hears back, so an agent started right after sees it.
    crate::instance::refresh_placeholders(proxy).await;
    reply
}

/// Carry out an admin's request on the vault (blocking).
fn apply(
    proxy: &Proxy,
    home: &Home,
    keys: &KeyConfig,
    peer: ControlPeer,
    request: AdminRequest,
) -> AdminReply {
    let vault = match Vault::open_with(home, keys) {
        Ok(vault) => vault,
        Err(err) => return AdminReply::error(format!("cannot open the vault: {err}")),
    };
    let audit = |kind: EventKind, provider: &str, profile: &str, command: &str| {
        proxy.audit().record(AuditEvent {
            uid: Some(peer.uid),
            pid: peer.pid,
            provider: Some(provider.to_string()),
            profile: Some(profile.to_string()),
            command: Some(command.to_string()),
            ..AuditEvent::new(kind)
        });
    };
    match &request {
        AdminRequest::Whoami => AdminReply::error("answered above"),
        AdminRequest::List => match vault.list() {
            Ok(credentials) => AdminReply::Ok {
                message: String::new(),
                credentials,
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
            let Some(found) = proxy.catalog().get(provider) else {
                return AdminReply::error(format!(
                    "unknown provider '{}' (see `broker providers`; the system broker knows the built-ins and /etc/broker/providers)",
                    if provider.len() > 32 { "(not shown)" } else { provider }
                ));
            };
            if let Err(err) = crate::vault::check_name("profile", profile) {
                return AdminReply::error(err.to_string());
            }
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
