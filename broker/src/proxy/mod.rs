//! The request path. Phases, in order, each in its own place:
//!
//! 1. **accept** (`listen`): a connection arrives on the run's fake address `127.77.<slot>.1`
//!    (rerouted there by the shim) or on the run's `[::1]` listener; it must come from our uid
//!    and open with the run's ticket (`ticket`), else it is refused; plain HTTP is refused,
//!    TLS is terminated with a leaf minted for the SNI, only if the SNI is one of the run's
//!    managed hosts (the SNI is what tells the hosts apart: see `listen` for why that is
//!    enough).
//! 2. **classify** (`handler`): SNI must equal `Host`/`:authority`; the host picks the
//!    provider and route; the run must allow that provider.
//! 3. **look up credential** (`handler`, via [`Credentials`]): only when the route's
//!    placeholder is present (or the route injects always).
//! 4. **swap** (`swap`): placeholder -> credential at the route's injection points only.
//! 5. **forward** (`upstream`, `pool`): to the provider's real host, resolved by the broker,
//!    verified TLS, kept open between requests and shared; WebSocket upgrades are bridged.
//! 6. **respond** (`handler`): the response streams back frame by frame.
//! 7. **audit** ([`AuditSink`]): one event per credential use, denial, or anomaly.

mod connect;
mod decode;
pub mod error;
mod handler;
pub mod limits;
mod listen;
mod matcher;
mod peer;
mod pool;
mod record;
mod redact;
pub mod sigv4;
pub mod swap;
mod ticket;
mod upgrade;
pub mod upstream;
pub mod upstream_proxy;
mod ws_redact;

/// Entry points for the fuzz targets and property tests (`fuzz/`): the response redactors,
/// which are otherwise private to the proxy.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;

    /// What the streaming body redactor sends on for a body of `chunks` echoing `secret`.
    pub fn redact_stream(secret: &[u8], chunks: &[&[u8]]) -> Vec<u8> {
        let mut redactor = super::redact::StreamRedactor::new(Arc::new(
            super::redact::Needles::for_secret(secret),
        ));
        let mut out = Vec::new();
        for chunk in chunks {
            redactor.feed(chunk, &mut out);
        }
        redactor.finish(&mut out);
        out
    }

    /// What the WebSocket redactor sends on for upstream frame bytes arriving as `chunks`.
    pub fn redact_ws(secret: &[u8], chunks: &[&[u8]]) -> Vec<u8> {
        let mut redactor = super::ws_redact::FrameRedactor::new(Arc::new(
            super::redact::Needles::for_secret(secret),
        ));
        let mut out = Vec::new();
        for chunk in chunks {
            redactor.feed(chunk, &mut out);
        }
        redactor.finish(&mut out);
        out
    }
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use zeroize::Zeroizing;

use crate::audit::AuditEvent;
use crate::ca::LocalCa;
use crate::providers::Catalog;
use crate::system::access::{AccessPolicy, UidPolicy};

pub use limits::Limits;
pub(crate) use listen::record_uid_refusal;
pub use listen::RunListeners;
pub use record::RequestEvent;
pub use redact::redact_text;
pub use upstream::{ResolveOverride, UpstreamSettings};
pub use upstream_proxy::UpstreamProxy;

/// Errors in bodies crossing the proxy (either side may break mid-stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the proxy sends and forwards.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Where the proxy gets real credentials. Called off the async runtime (it may touch SQLite or
/// a keyring), so implementations may block.
pub trait Credentials: Send + Sync + 'static {
    /// The secret for `provider`/`profile`; `Ok(None)` when none is stored.
    fn lookup(
        &self,
        provider: &str,
        profile: &str,
    ) -> Result<Option<Zeroizing<String>>, LookupError>;

    /// Has the user accepted that `provider`'s credentials go where `grant` says (see
    /// `providers::trust`)? Checked before a credential is put on a request.
    /// May block (it may open the vault); [`Credentials::accepted_now`] is tried first.
    fn accepts(&self, provider: &str, grant: &str) -> Result<bool, LookupError> {
        Ok(crate::providers::trust::builtin_grants(provider)
            .is_some_and(|grants| grants.iter().any(|g| g == grant)))
    }

    /// [`crate::vault::Vault::prove`] by the vault this broker serves from, if it has one
    /// open (blocks: it may open it).
    fn prove(&self, _challenge: &[u8]) -> Option<Vec<u8>> {
        None
    }

    /// [`Credentials::accepts`] from what is known without blocking, if it is.
    fn accepted_now(&self, _provider: &str, _grant: &str) -> Option<bool> {
        None
    }

    /// The (provider, profile) pairs that have a credential stored, for deciding which
    /// placeholders a run's agent gets; `None` when that cannot be known (every provider's
    /// variables are then set). Blocks: it may open the vault.
    fn stored(&self) -> Option<Vec<(String, String)>> {
        None
    }

    /// A secret known to be current without blocking (no I/O beyond a non-blocking check), if any:
    /// tried before [`Credentials::lookup`], which runs on a blocking thread.
    fn cached(&self, _provider: &str, _profile: &str) -> Option<Zeroizing<String>> {
        None
    }

    /// Was the key of `provider`/`profile` ever kept by [`Credentials::cached`]'s cache (an
    /// API key)? Then requests that miss the cache together read the vault one at a time.
    fn cacheable(&self, _provider: &str, _profile: &str) -> bool {
        false
    }

    /// Could [`Credentials::refresh_rejected`] produce a different secret for this credential?
    /// When not (a plain API key), the proxy skips keeping a copy of the request for a retry.
    fn may_renew(&self, _provider: &str, _profile: &str) -> bool {
        true
    }

    /// The upstream answered 401 to `rejected`: a fresher secret, if there is one (an OAuth
    /// refresh, single-flight with every other process), else `Ok(None)`.
    fn refresh_rejected(
        &self,
        _provider: &str,
        _profile: &str,
        _rejected: &str,
    ) -> Result<Option<Zeroizing<String>>, LookupError> {
        Ok(None)
    }
}

/// Why [`Credentials::lookup`] produced no secret. Messages never contain one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The vault (or a token endpoint) failed: a message for the user.
    Unavailable(String),
    /// An OAuth login expired and could not be refreshed: the user must log in again.
    LoginExpired,
    /// The credential's source (a `--from-command` command) failed: its message.
    Source(String),
    /// The stored credential failed its integrity check (changed outside broker): the
    /// message names it and says how to recover. It is not used.
    Integrity(String),
}

impl From<String> for LookupError {
    fn from(message: String) -> LookupError {
        LookupError::Unavailable(message)
    }
}

/// Where the proxy reports what happened. Must not block: implementations queue.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, event: AuditEvent);

    /// A request's event, turned into its line by the sink: the audit writer does that on its
    /// own thread, off the request path.
    fn record_request(&self, event: RequestEvent) {
        self.record(event.into_event());
    }

    /// Whether events reach the log. While they do not, the proxy uses no credential: an
    /// unaudited use is what the audit exists to rule out.
    fn writable(&self) -> bool {
        true
    }
}

/// One agent run as the proxy sees it: which hosts it reaches through its fake address,
/// which providers it may use, and under which profile.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub id: String,
    /// Third octet of the run's fake address.
    pub slot: u8,
    /// Managed host patterns: the names the shim and the DNS responder resolve to the run's
    /// address, and the TLS server names its listeners accept.
    pub hosts: Vec<String>,
    /// `None`: every provider with a stored credential; `Some`: only these.
    pub allow: Option<Vec<String>>,
    /// Profile per provider; providers not listed use `default_profile`.
    pub profiles: HashMap<String, String>,
    pub default_profile: String,
    /// The agent's pid and command line, for the audit.
    pub pid: AgentPid,
    pub command: String,
    /// Keys handed to this run only, used before the credential store.
    pub run_keys: RunKeys,
    /// Refuse CONNECT to anything but managed hosts.
    pub deny_unlisted: bool,
    /// The run's secret ticket: every connection to its listeners must present it (the
    /// preamble on the fake address and `[::1]`, `Proxy-Authorization` on the CONNECT
    /// listener).
    pub ticket: broker_contract::Ticket,
    /// The run's policy (`crate::policy`), compiled when the run opened.
    pub policy: Arc<crate::policy::RunPolicy>,
    /// The only uid whose connections this run serves, when it is not every uid the broker
    /// admits: a system broker's run opened by a shim's handover belongs to that shim's uid.
    pub owner: Option<u32>,
}

/// The agent's pid, for the audit. Shared and settable because the run opens (listeners,
/// shim config) before the agent can be started; the launcher fills it in once it is.
#[derive(Debug, Clone, Default)]
pub struct AgentPid(Arc<std::sync::atomic::AtomicU32>);

impl AgentPid {
    pub fn new(pid: Option<u32>) -> AgentPid {
        AgentPid(Arc::new(pid.unwrap_or(0).into()))
    }

    pub fn set(&self, pid: u32) {
        self.0.store(pid, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u32> {
        Some(self.0.load(std::sync::atomic::Ordering::Relaxed)).filter(|&pid| pid != 0)
    }
}

/// Keys handed to one run (a real key found in the launcher's environment): used before the
/// vault and never stored. `Debug` prints only the provider names.
#[derive(Clone, Default)]
pub struct RunKeys(pub HashMap<String, Zeroizing<String>>);

impl std::fmt::Debug for RunKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl RunContext {
    pub fn allows(&self, provider: &str) -> bool {
        self.allow
            .as_ref()
            .is_none_or(|list| list.iter().any(|p| p == provider))
    }

    pub fn profile_for(&self, provider: &str) -> &str {
        self.profiles
            .get(provider)
            .map(String::as_str)
            .unwrap_or(&self.default_profile)
    }

    /// Is `host` one of the run's managed names? A linear scan, once per connection: with
    /// the 291 patterns of a run with an AWS key, under a microsecond for a name matched late
    /// or not at all, beside a TLS handshake's hundreds.
    pub fn manages(&self, host: &str) -> bool {
        self.hosts
            .iter()
            .any(|p| broker_contract::host_matches(p, host))
    }
}

/// Everything the proxy needs, built by the CLI from flags, env and the home directory.
pub struct ProxySettings {
    pub catalog: Arc<Catalog>,
    pub upstream: UpstreamSettings,
    pub credentials: Arc<dyn Credentials>,
    pub audit: Arc<dyn AuditSink>,
    /// Label in the CA's name (run id or "serve").
    pub label: String,
    /// Timeouts and connection caps (`Limits::default()` but in tests).
    pub limits: Limits,
    /// `$BROKER_HOME/policy.toml`, read as each run opens.
    pub policy_file: Option<std::path::PathBuf>,
    /// `None`: only the broker's own uid may connect. `Some`: a system broker, which admits
    /// the uids of its access list, each under its own policy.
    pub access: Option<Arc<AccessPolicy>>,
}

/// The shared state of one broker instance: its CA, the catalog, the upstream pool.
pub struct Proxy {
    ca: Arc<LocalCa>,
    catalog: Arc<Catalog>,
    tls_server: Arc<rustls::ServerConfig>,
    pool: Arc<pool::UpstreamPool>,
    credentials: Arc<dyn Credentials>,
    audit: Arc<dyn AuditSink>,
    needles: redact::NeedleCache,
    caps: limits::Caps,
    /// `--dns-upstream`: where the runs' DNS responders forward; empty: `/etc/resolv.conf`.
    dns_upstream: Vec<SocketAddr>,
    policy_file: Option<std::path::PathBuf>,
    /// Requests waiting for `broker approve` (`crate::approvals`).
    approvals: Arc<crate::approvals::Approvals>,
    /// See [`ProxySettings::access`].
    access: Option<Arc<AccessPolicy>>,
    /// The short-lived credentials of AWS roles the broker assumed (`sigv4::assume`).
    aws_roles: sigv4::assume::RoleCache,
    /// The shim config of the run bare preloads use (`broker serve`'s, the system broker's)
    /// and where it is written, once [`crate::instance::keep_placeholders_current`] keeps
    /// its placeholders in step with the vault.
    pub(crate) daemon_shim:
        tokio::sync::Mutex<Option<(broker_contract::ShimConfig, std::path::PathBuf)>>,
    /// One vault read at a time per provider for what the caches keep (`handler::lookup`,
    /// `handler::accepted`).
    vault_reads: handler::VaultReads,
    /// The network's way out, if it needs one: the CONNECT listener's tunnels to unmanaged
    /// hosts go through it too (the pool's connector has its own handle).
    upstream_proxy: Option<Arc<UpstreamProxy>>,
}

impl Proxy {
    pub fn new(settings: ProxySettings) -> anyhow::Result<Arc<Proxy>> {
        if settings.upstream.extra_ca.is_some()
            || !settings.upstream.resolve.is_empty()
            || !settings.upstream.dns.is_empty()
        {
            tracing::warn!(
                extra_ca = ?settings.upstream.extra_ca,
                resolve = ?settings.upstream.resolve,
                dns = ?settings.upstream.dns,
                "test-only upstream overrides are ON (--upstream-ca / --resolve / --dns-upstream)"
            );
        }
        let dns_upstream = settings.upstream.dns.clone();
        let upstream_proxy = settings.upstream.proxy.clone();
        let hosts = settings.catalog.host_patterns();
        let ca = Arc::new(LocalCa::new(&hosts, &settings.label)?);
        let tls_server = listen::server_config(ca.clone())?;
        let connector = upstream::UpstreamConnector::new(
            settings.upstream,
            settings.catalog.private_address_hosts(),
        );
        let pool = pool::UpstreamPool::new(connector);
        Ok(Arc::new(Proxy {
            ca,
            catalog: settings.catalog,
            tls_server,
            pool,
            credentials: settings.credentials,
            audit: settings.audit,
            needles: redact::NeedleCache::default(),
            caps: limits::Caps::new(settings.limits),
            dns_upstream,
            policy_file: settings.policy_file,
            approvals: crate::approvals::Approvals::new(),
            access: settings.access,
            aws_roles: sigv4::assume::RoleCache::default(),
            daemon_shim: tokio::sync::Mutex::new(None),
            vault_reads: handler::VaultReads::default(),
            upstream_proxy,
        }))
    }

    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    /// Where this broker's audit events go.
    pub fn audit(&self) -> &Arc<dyn AuditSink> {
        &self.audit
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The access list of a system broker; `None` for a broker that serves its own uid only.
    pub fn access(&self) -> Option<&Arc<AccessPolicy>> {
        self.access.as_ref()
    }

    /// Where this broker's credentials come from.
    pub fn credentials(&self) -> Arc<dyn Credentials> {
        self.credentials.clone()
    }

    /// Where a run's DNS responder forwards the names it does not manage: the override, or
    /// the system's nameservers as `/etc/resolv.conf` names them now.
    pub fn dns_upstream(&self) -> Vec<SocketAddr> {
        match self.dns_upstream.is_empty() {
            true => crate::dns::upstream::system_nameservers(),
            false => self.dns_upstream.clone(),
        }
    }

    /// The requests of this broker waiting for `broker approve`.
    pub fn approvals(&self) -> &Arc<crate::approvals::Approvals> {
        &self.approvals
    }

    /// `$BROKER_HOME/policy.toml`, parsed against this broker's catalog, if there is one.
    pub fn home_policy(&self) -> Result<Option<crate::policy::Layer>, crate::policy::PolicyError> {
        match &self.policy_file {
            Some(path) => crate::policy::load_file(path, &self.catalog),
            None => Ok(None),
        }
    }

    /// Open the listeners of one run and serve them until the returned handle is dropped.
    pub async fn open_run(self: &Arc<Self>, run: RunContext) -> std::io::Result<RunListeners> {
        listen::open_run(self.clone(), Arc::new(run)).await
    }
}

/// Per-connection facts the handler needs.
#[derive(Debug)]
struct ConnInfo {
    run: Arc<RunContext>,
    sni: String,
    /// Where the SNI is served in `Proxy::catalog` (fixed for the proxy's life), found once
    /// per connection. `None`: the catalog does not serve the SNI.
    route: Option<crate::providers::Serving>,
    #[allow(dead_code)]
    peer: SocketAddr,
    /// Who is at the other end, as the kernel says.
    peer_id: PeerId,
    /// The connection's place under the caps: held as long as anything serves it (an
    /// upgraded connection's splice holds it too).
    _slot: Arc<limits::Slot>,
}

/// The uid of an admitted connection, and (system broker) the policy it is served under.
#[derive(Debug, Clone)]
pub(crate) struct PeerId {
    pub uid: u32,
    /// `Some` on a system broker: what this uid may use.
    pub policy: Option<Arc<UidPolicy>>,
}

impl ConnInfo {
    /// The run allows `provider`, and so does the uid's policy on a system broker.
    fn allows(&self, provider: &str) -> bool {
        self.run.allows(provider)
            && self
                .peer_id
                .policy
                .as_ref()
                .is_none_or(|p| p.allows(provider))
    }

    /// The profile a request for `provider` uses: on a system broker the uid's policy says.
    fn profile_for(&self, provider: &str) -> &str {
        match &self.peer_id.policy {
            Some(policy) => &policy.profile,
            None => self.run.profile_for(provider),
        }
    }

    /// The uid, for the audit of a system broker (where several users share it).
    fn audit_uid(&self) -> Option<u32> {
        self.peer_id.policy.as_ref().map(|_| self.peer_id.uid)
    }
}
