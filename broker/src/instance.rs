//! A running broker instance: the proxy, one run's listeners, and the runtime files the shim
//! reads (the run CA and the shim config). Shared by `broker serve`, `broker run` and
//! `broker demo`, so all three serve requests the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use broker_contract::ShimConfig;

use crate::denials::DenialLog;
use crate::home::{ensure_private_dir, write_private_file, Home};
use crate::providers::Catalog;
use crate::proxy::{
    AgentPid, Proxy, ProxySettings, RunContext, RunKeys, RunListeners, UpstreamSettings,
};
use crate::vault::{KeyConfig, Vault};

/// What one run may do.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub id: String,
    /// `None`: all providers.
    pub allow: Option<Vec<String>>,
    pub profiles: HashMap<String, String>,
    pub default_profile: String,
    pub deny_unlisted: bool,
    /// Set by the launcher once the agent runs.
    pub pid: AgentPid,
    pub command: String,
    /// Keys handed to this run only (a real key found in the launcher's environment), used
    /// before the vault and never stored.
    pub run_keys: RunKeys,
    /// The run's own policy layers (`--policy`, `--allow P:M:/path`, `--policy-mode`), on top
    /// of `$BROKER_HOME/policy.toml`.
    pub policy: crate::policy::RunPolicySpec,
    /// A system broker's run that only this uid may use (it handed the run's keys).
    pub owner: Option<u32>,
}

impl RunSpec {
    /// The request `broker run` sends to a running `broker serve` for this run.
    pub fn to_request(&self) -> crate::control::OpenRun {
        crate::control::OpenRun {
            allow: self.allow.clone(),
            profile: self.default_profile.clone(),
            deny_unlisted: self.deny_unlisted,
            pid: self.pid.get(),
            command: self.command.clone(),
            run_keys: self
                .run_keys
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            policy: Some(self.policy.clone()),
            owner: self.owner,
        }
    }
}

/// Everything needed to start an instance.
pub struct InstanceSettings {
    pub home: Home,
    pub upstream: UpstreamSettings,
    pub label: String,
    /// Timeouts and connection caps of the proxy.
    pub limits: crate::proxy::Limits,
    /// How to unlock the vault (from the environment, or fixed by `broker demo`).
    pub keys: KeyConfig,
    /// Directory for this instance's runtime files (created 0700; 0755 for a system broker).
    pub runtime_dir: PathBuf,
    pub run: RunSpec,
    /// A system broker: its access list and its catalog (built-ins and root-owned
    /// definitions only). `None`: a broker of this user, with the home's catalog.
    pub system: Option<SystemSettings>,
}

/// What makes an instance a system broker (see [`crate::system`]).
pub struct SystemSettings {
    pub access: Arc<crate::system::access::AccessPolicy>,
    pub catalog: Catalog,
}

/// A started instance. Dropping it stops its listeners.
pub struct Instance {
    pub proxy: Arc<Proxy>,
    pub listeners: RunListeners,
    pub shim: ShimConfig,
    pub shim_config_path: PathBuf,
    pub denials: Option<DenialLog>,
    /// The run's DNS responder (see [`crate::dns`]); stops when dropped.
    pub dns: Option<crate::dns::Responder>,
    /// Where `broker approve` reaches this broker; removed when dropped.
    pub approvals: Option<crate::approvals::Listener>,
}

/// Run slot of the first run of every instance. Each instance listens on its own port, so
/// instances never collide on the address; the slot matters only within one instance.
pub const FIRST_SLOT: u8 = 1;

pub async fn start(settings: InstanceSettings) -> anyhow::Result<Instance> {
    let home = settings.home;
    home.ensure()
        .with_context(|| format!("cannot create BROKER_HOME {}", home.root().display()))?;
    let (catalog, access) = match settings.system {
        Some(system) => (Arc::new(system.catalog), Some(system.access)),
        None => (Arc::new(Catalog::load(&home)?), None),
    };
    // The vault is unlocked at start (created on first use): the audit log is keyed by it, and
    // checked against the head it keeps before any credential is used.
    let vault = Arc::new(
        Vault::open_with(&home, &settings.keys)
            .context("the broker keys its audit log with the vault, and cannot open it")?,
    );
    let audit = crate::audit_queue::AuditQueue::start(&home, &vault).context(
        "the broker does not use credentials it cannot audit: fix the audit log or BROKER_HOME",
    )?;
    let private_providers = catalog.private_address_providers();
    let proxy = Proxy::new(ProxySettings {
        catalog,
        upstream: settings.upstream.clone(),
        credentials: Arc::new(
            crate::credentials::VaultCredentials::new(home.clone(), settings.keys)
                .with_vault(vault)
                .with_token_endpoints(crate::oauth::refresh::TokenEndpoints {
                    upstream: settings.upstream.clone(),
                    private_providers,
                }),
        ),
        audit: Arc::new(audit),
        label: settings.label,
        limits: settings.limits,
        policy_file: Some(home.root().join(crate::policy::HOME_POLICY_FILE)),
        access,
    })?;
    let run = open_run(&proxy, settings.run, FIRST_SLOT, &settings.runtime_dir).await?;
    let approvals = match crate::approvals::listen(&home, proxy.approvals().clone()) {
        Ok(listener) => Some(listener),
        Err(err) => {
            tracing::warn!(%err, "no socket for broker approve: requests whose rule asks for approval will time out");
            None
        }
    };
    Ok(Instance {
        proxy,
        listeners: run.listeners,
        shim: run.shim,
        shim_config_path: run.shim_config_path,
        denials: run.denials,
        dns: run.dns,
        approvals,
    })
}

/// The (provider, profile) pairs with a stored credential, or `None` if unknown.
async fn stored_credentials(proxy: &Arc<Proxy>) -> Option<Vec<(String, String)>> {
    let credentials = proxy.credentials();
    tokio::task::spawn_blocking(move || credentials.stored())
        .await
        .unwrap_or(None)
}

/// (variable, placeholder) pairs of a shim config's `env` or `env-if-set` lines.
type VarPlaceholders = Vec<(String, String)>;

/// Which variables a run's agent gets its providers' placeholders in: `env` (set when unset)
/// for the providers the run has a credential for, `env_if_set` (only a real key there is
/// replaced) for the rest.
///
/// Only providers with a credential get placeholders set: with a catalog of a hundred
/// providers, an agent given every placeholder would pick a provider it has no key for
/// (aider and llm choose their model by which key is set), and tools that send a token
/// variable when it is set (`npm` through `.npmrc`, `twine`, `gh`) would send a placeholder
/// instead of falling back to their own login. A real key the agent was started with is
/// still replaced and handed over, for any provider. `stored: None` (the vault could not be
/// read) sets every provider's variables, as before there was a choice.
fn placeholder_env(
    catalog: &Catalog,
    allow: Option<&[String]>,
    profiles: &HashMap<String, String>,
    default_profile: &str,
    handed: &dyn Fn(&str) -> bool,
    stored: Option<&[(String, String)]>,
) -> (VarPlaceholders, VarPlaceholders) {
    let profile_for = |name: &str| profiles.get(name).map_or(default_profile, String::as_str);
    let (mut env, mut env_if_set) = (Vec::new(), Vec::new());
    let allowed = catalog
        .providers()
        .iter()
        .filter(|p| allow.is_none_or(|a| a.contains(&p.name)));
    for p in allowed {
        let has_credential = handed(&p.name)
            || stored.is_none_or(|rows| {
                rows.iter()
                    .any(|(name, profile)| *name == p.name && *profile == profile_for(&p.name))
            });
        // An AWS credential's secret variable goes with its key id's; its session token's is
        // only ever replaced where set (`Provider::env_placeholders`).
        match has_credential {
            true => env.extend(p.env_placeholders()),
            false => env_if_set.extend(p.env_placeholders()),
        }
        env_if_set.extend(p.env_if_set_placeholders());
    }
    (env, env_if_set)
}

/// How often `broker serve` looks for credentials added or removed since it wrote its shim
/// config: a bare preload started a moment after `broker add` should get the placeholder.
/// One look is a read of the vault's row names (no secret is decrypted).
const PLACEHOLDER_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// Keep the placeholders of the run bare preloads use (`broker serve`'s own, or the system
/// broker's: every provider, default profiles, no handed keys) in step with the vault,
/// looking every [`PLACEHOLDER_REFRESH`]; the system broker's admin requests also refresh at
/// once ([`refresh_placeholders`]) before they answer. Aborted with the returned handle.
pub fn keep_placeholders_current(
    proxy: Arc<Proxy>,
    shim: ShimConfig,
    path: PathBuf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        *proxy.daemon_shim.lock().await = Some((shim, path));
        loop {
            tokio::time::sleep(PLACEHOLDER_REFRESH).await;
            refresh_placeholders(&proxy).await;
        }
    })
}

/// Rewrite the bare-preload run's shim config (temp file + rename) if the vault's
/// credentials changed which variables get placeholders. A no-op where nothing keeps them.
pub async fn refresh_placeholders(proxy: &Arc<Proxy>) {
    let stored = stored_credentials(proxy).await;
    let mut slot = proxy.daemon_shim.lock().await;
    let Some((shim, path)) = slot.as_mut() else {
        return;
    };
    let (env, env_if_set) = placeholder_env(
        proxy.catalog(),
        None,
        &HashMap::new(),
        "default",
        &|_| false,
        stored.as_deref(),
    );
    if env == shim.env && env_if_set == shim.env_if_set {
        return;
    }
    shim.env = env;
    shim.env_if_set = env_if_set;
    // The system broker's config is for its allowed uids to read (see `open_run`).
    let written = match proxy.access().is_some() {
        true => crate::home::write_shared_file(path, shim.render().as_bytes()),
        false => write_private_file(path, shim.render().as_bytes()),
    };
    if let Err(err) = written {
        tracing::warn!(%err, path = %path.display(), "cannot update the shim config's placeholders");
    }
}

/// One open run: its listeners and the shim config written for it.
pub struct OpenRun {
    pub listeners: RunListeners,
    pub shim: ShimConfig,
    pub shim_config_path: PathBuf,
    /// With `--deny-unlisted`: the shim's refusals, moved into the audit log.
    pub denials: Option<DenialLog>,
    /// The run's DNS responder; `None` if it could not bind (the run works without it, for
    /// every resolver that goes through `getaddrinfo`).
    pub dns: Option<crate::dns::Responder>,
}

/// The host patterns a run manages: every provider's, but a signing provider's (AWS) only
/// when the run has a credential for it. Without one there is nothing to sign with, so AWS
/// traffic goes on directly as it did before broker managed it (an SDK using its own
/// `~/.aws/credentials`). `stored: None` (the vault could not be read) keeps every host, as
/// `placeholder_env` keeps every placeholder.
fn run_hosts(
    catalog: &Catalog,
    profiles: &HashMap<String, String>,
    default_profile: &str,
    handed: &dyn Fn(&str) -> bool,
    stored: Option<&[(String, String)]>,
) -> Vec<String> {
    let profile_for = |name: &str| profiles.get(name).map_or(default_profile, String::as_str);
    let unused: Vec<&str> = catalog
        .providers()
        .iter()
        .filter(|p| p.aws_sigv4.is_some())
        .filter(|p| {
            !handed(&p.name)
                && stored.is_some_and(|rows| {
                    !rows
                        .iter()
                        .any(|(name, profile)| *name == p.name && *profile == profile_for(&p.name))
                })
        })
        .flat_map(|p| p.host_patterns())
        .collect();
    catalog
        .host_patterns()
        .into_iter()
        .filter(|h| !unused.contains(&h.as_str()))
        .collect()
}

/// Open a run on `proxy` in `slot`, writing its CA and shim config into `runtime_dir`.
pub async fn open_run(
    proxy: &Arc<Proxy>,
    spec: RunSpec,
    slot: u8,
    runtime_dir: &Path,
) -> anyhow::Result<OpenRun> {
    let catalog = proxy.catalog();
    let run_id = spec.id.clone();
    let default_profile = if spec.default_profile.is_empty() {
        "default".to_string()
    } else {
        spec.default_profile
    };
    let stored = stored_credentials(proxy).await;
    let hosts = run_hosts(
        catalog,
        &spec.profiles,
        &default_profile,
        &|name| spec.run_keys.0.contains_key(name),
        stored.as_deref(),
    );
    let (env, env_if_set) = placeholder_env(
        catalog,
        spec.allow.as_deref(),
        &spec.profiles,
        &default_profile,
        &|name| spec.run_keys.0.contains_key(name),
        stored.as_deref(),
    );
    // The policy is compiled once, here: the home file is read when the run opens (so an
    // edit applies to the next run), the run's own layers come with it.
    let mut layers = Vec::new();
    if let Some(home_policy) = proxy.home_policy()? {
        layers.push(home_policy);
    }
    layers.extend(spec.policy.layers(catalog)?);
    let policy = crate::policy::RunPolicy::compile(
        &layers,
        |provider| {
            spec.profiles
                .get(provider)
                .map(String::as_str)
                .unwrap_or(&default_profile)
        },
        spec.policy.mode,
    );
    let ticket = new_ticket()?;
    let run = RunContext {
        id: spec.id,
        slot,
        hosts: hosts.clone(),
        allow: spec.allow,
        profiles: spec.profiles,
        default_profile,
        policy: Arc::new(policy),
        pid: spec.pid,
        command: spec.command.clone(),
        run_keys: spec.run_keys,
        deny_unlisted: spec.deny_unlisted,
        ticket: ticket.clone(),
        owner: spec.owner,
    };
    let names = crate::dns::RunNames {
        slot,
        hosts: hosts.clone(),
    };
    let listeners = proxy
        .open_run(run)
        .await
        .context("cannot open the broker's loopback listeners")?;
    let dns = match crate::dns::start(names, proxy.dns_upstream()).await {
        Ok(responder) => Some(responder),
        Err(err) => {
            tracing::warn!(%err, "no DNS responder for this run: resolvers that bypass getaddrinfo get real addresses");
            None
        }
    };

    // A system broker's runtime files are read by its users' shims, as another uid: the
    // directory is 0755 and the files 0644 (the broker's user alone writes them). What they
    // hold: the CA certificate (public), the listeners' ports and the run's ticket, which is
    // no use to another uid since every connection's uid is checked first.
    let shared = proxy.access().is_some();
    let write_file = |path: &Path, contents: &[u8]| match shared {
        true => crate::home::write_shared_file(path, contents),
        false => write_private_file(path, contents),
    };
    match shared {
        true => crate::home::ensure_shared_dir(runtime_dir)?,
        false => ensure_private_dir(runtime_dir)?,
    }
    let ca_file = runtime_dir.join("ca.pem");
    write_file(&ca_file, proxy.ca().cert_pem().as_bytes())?;
    let denials = match spec.deny_unlisted {
        true => Some(DenialLog::start(
            &runtime_dir.join("denials.log"),
            &run_id,
            &spec.command,
            proxy.audit().clone(),
        )?),
        false => None,
    };
    let shim = ShimConfig {
        slot,
        port: listeners.port,
        port6: listeners.port6,
        ca_file,
        deny_unlisted: spec.deny_unlisted,
        hosts,
        env,
        env_if_set,
        connect_proxy: Some(listeners.connect_addr.to_string()),
        denial_log: denials.as_ref().map(|d| d.path().to_path_buf()),
        ticket: Some(ticket),
        dns: dns.as_ref().map(|d| d.addr),
    };
    let shim_config_path = runtime_dir.join(broker_contract::DAEMON_SHIM_CONFIG_FILE);
    write_file(&shim_config_path, shim.render().as_bytes())?;
    Ok(OpenRun {
        listeners,
        shim,
        shim_config_path,
        denials,
        dns,
    })
}

/// A fresh run ticket from the OS's random source. Each run gets its own, written only into
/// its 0600 shim config (in the run's 0700 directory), so only that run's processes (and,
/// outside a sandbox, the user's other processes, which can read the user's files) hold it.
fn new_ticket() -> anyhow::Result<broker_contract::Ticket> {
    use ring::rand::SecureRandom as _;
    let mut bytes = zeroize::Zeroizing::new([0u8; broker_contract::TICKET_BYTES]);
    ring::rand::SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(broker_contract::Ticket::from_bytes(&bytes))
}

/// Remove a runtime file, ignoring a file that is already gone.
pub fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_hosts_are_managed_only_with_an_aws_credential() {
        let catalog = crate::providers::Catalog::builtin();
        let none = HashMap::new();
        let is_aws = |h: &String| h.ends_with(".amazonaws.com") || h.ends_with(".amazonaws.com.cn");
        let without = run_hosts(&catalog, &none, "default", &|_| false, Some(&[]));
        assert!(!without.iter().any(is_aws), "no credential, no AWS hosts");
        assert!(
            without.iter().any(|h| h == "api.openai.com"),
            "other providers' hosts are always managed"
        );
        let stored = [("aws".to_string(), "default".to_string())];
        let with = run_hosts(&catalog, &none, "default", &|_| false, Some(&stored));
        assert!(with.iter().any(is_aws));
        assert_eq!(with.len(), catalog.host_patterns().len());
        let handed = run_hosts(&catalog, &none, "default", &|name| name == "aws", Some(&[]));
        assert!(handed.iter().any(is_aws));
        let other_profile = run_hosts(&catalog, &none, "work", &|_| false, Some(&stored));
        assert!(
            !other_profile.iter().any(is_aws),
            "the run's profile has none"
        );
        let unreadable = run_hosts(&catalog, &none, "default", &|_| false, None);
        assert_eq!(unreadable.len(), catalog.host_patterns().len());
    }
}
