//! `broker doctor`: is everything in place, and does the swap work on this machine?
//!
//! Checks the home directory, the vault and its key source, the audit chain, the provider
//! files, the CA, the shim and the daemon, then runs an offline self-test of each client
//! runtime found (curl, python3, node, wget) through a throwaway broker. Exit 1 if anything
//! failed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::ca::LocalCa;
use crate::home::Home;
use crate::providers::Catalog;
use crate::selftest::SelfTest;
use crate::vault::Vault;
use crate::{audit, control, launch};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Skip the client self-tests (only check files and settings).
    #[arg(long)]
    pub no_self_test: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Serialize)]
struct Check {
    check: String,
    status: Status,
    detail: String,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        check: name.into(),
        status,
        detail: detail.into(),
    }
}

/// Can `broker run` sandbox its agents here? Starts the sandbox's stages for real.
fn sandbox_check(home: &Home) -> Check {
    let dir = crate::home::runtime_base().unwrap_or_else(|| home.daemon_dir());
    if let Err(err) = crate::home::ensure_private_dir(&dir) {
        return check(
            "sandbox",
            Status::Fail,
            format!("cannot create {}: {err}", dir.display()),
        );
    }
    match crate::sandbox::probe(&dir) {
        Ok(()) => check(
            "sandbox",
            Status::Ok,
            "`broker run` starts agents in their own user, mount and PID namespaces",
        ),
        Err(why) => check(
            "sandbox",
            Status::Fail,
            format!(
                "not available ({why}): `broker run` runs agents without it, and they can read $BROKER_HOME. {}",
                crate::sandbox::fix_hint()
            ),
        ),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env()?;
    let mut checks = vec![home_check(&home)];
    checks.push(vault_check(&home));
    checks.push(audit_check(&home));
    let catalog = Catalog::load(&home);
    checks.push(match &catalog {
        Ok(c) => {
            let custom = c
                .providers()
                .iter()
                .filter(|p| !p.origin().is_builtin())
                .count();
            check(
                "providers",
                Status::Ok,
                format!("{} providers ({custom} custom)", c.providers().len()),
            )
        }
        Err(err) => check("providers", Status::Fail, err.to_string()),
    });
    if let Ok(c) = &catalog {
        let patterns = c.host_patterns();
        checks.push(match LocalCa::new(&patterns, "doctor") {
            Ok(_) => check(
                "local CA",
                Status::Ok,
                format!(
                    "name-constrained to {} host patterns; its key never leaves memory",
                    patterns.len()
                ),
            ),
            Err(err) => check("local CA", Status::Fail, err.to_string()),
        });
    }
    checks.push(match launch::locate_shim() {
        Ok(Some((path, origin))) => check(
            "libbroker.so",
            Status::Ok,
            match origin {
                launch::ShimOrigin::Env => format!("{} (from BROKER_SHIM_LIB)", path.display()),
                launch::ShimOrigin::Installed => path.display().to_string(),
                launch::ShimOrigin::Embedded => format!(
                    "{} (carried inside the broker binary; checked against it before every run)",
                    path.display()
                ),
            },
        ),
        Ok(None) => check(
            "libbroker.so",
            Status::Fail,
            "not found next to the broker binary nor carried inside it: build the workspace, install with `cargo install --path broker`, or set BROKER_SHIM_LIB",
        ),
        Err(err) => check("libbroker.so", Status::Fail, format!("{err:#}")),
    });
    checks.push(sandbox_check(&home));
    checks.push(
        match std::os::unix::net::UnixStream::connect(control::socket_path(&home)) {
            Ok(_) => check("broker serve", Status::Ok, "running; `broker run` joins it"),
            Err(_) => check(
                "broker serve",
                Status::Skip,
                "not running; `broker run` embeds its own broker",
            ),
        },
    );
    checks.push(upstream_proxy_check(&home));
    checks.extend(preload_checks(&home));
    if !args.no_self_test {
        checks.extend(self_tests());
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(10);
        for c in &checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "-",
            };
            println!("{:<width$}  {:<4}  {}", c.check, status, c.detail);
        }
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The system broker, and which broker a bare `LD_PRELOAD=libbroker.so` in this environment
/// would use: the shim's own order (`BROKER_SHIM_CONFIG`, this user's `broker serve`, the
/// system broker), with the shim's trust rules.
fn preload_checks(home: &Home) -> Vec<Check> {
    use crate::system::admin::{self, AdminReply, AdminRequest};
    let run_dir = crate::system::client_run_dir();
    let config = run_dir.join(broker_contract::DAEMON_SHIM_CONFIG_FILE);
    let me = rustix::process::getuid().as_raw();
    let mut logins = None;
    let (system, system_usable) = if !config.exists() {
        (
            check(
                "system broker",
                Status::Skip,
                format!(
                    "none at {} (`broker system install` sets one up)",
                    run_dir.display()
                ),
            ),
            false,
        )
    } else {
        match crate::system::ownership::system_broker_uid(&run_dir) {
            Err(why) => (
                check(
                    "system broker",
                    Status::Fail,
                    format!("{why}: shims will not trust it"),
                ),
                false,
            ),
            Ok(uid) => {
                let socket = run_dir.join(broker_contract::DAEMON_CONTROL_SOCKET);
                match admin::request(&socket, &AdminRequest::Whoami) {
                    Ok(AdminReply::Ok { message, .. }) if message == "refused" => (
                        check(
                            "system broker",
                            Status::Warn,
                            format!(
                                "running as uid {uid} at {}, but uid {me} is not on its access list (/etc/broker/config.toml)",
                                run_dir.display()
                            ),
                        ),
                        false,
                    ),
                    Ok(AdminReply::Ok { message, .. }) => {
                        if message == "admin" {
                            logins = Some(system_logins(&socket));
                        }
                        (
                        check(
                            "system broker",
                            Status::Ok,
                            format!(
                                "running as uid {uid} at {}; uid {me} may {}",
                                run_dir.display(),
                                if message == "admin" {
                                    "use and administer it (`broker add|login --system`)"
                                } else {
                                    "use its credentials"
                                }
                            ),
                        ),
                        true,
                    )
                    }
                    Ok(AdminReply::Error { error }) => {
                        (check("system broker", Status::Fail, error), false)
                    }
                    Err(err) => (
                        check("system broker", Status::Fail, format!("{err:#}")),
                        false,
                    ),
                }
            }
        }
    };
    let user_config = home
        .daemon_dir()
        .join(broker_contract::DAEMON_SHIM_CONFIG_FILE);
    let preload = if let Some(explicit) = std::env::var_os(broker_contract::ENV_SHIM_CONFIG) {
        check(
            "bare preload",
            Status::Ok,
            format!(
                "uses the run named by BROKER_SHIM_CONFIG ({})",
                PathBuf::from(explicit).display()
            ),
        )
    } else if user_config.exists() {
        check(
            "bare preload",
            Status::Ok,
            format!(
                "uses this user's `broker serve` ({})",
                user_config.display()
            ),
        )
    } else if system_usable {
        check(
            "bare preload",
            Status::Ok,
            format!(
                "uses the system broker ({}): no `broker serve` of this user is running",
                config.display()
            ),
        )
    } else {
        check(
            "bare preload",
            Status::Warn,
            "finds no broker it may use: nothing is rerouted and managed hosts get only placeholders (start `broker serve`, or use `broker run`)",
        )
    };
    [Some(system), logins, Some(preload)]
        .into_iter()
        .flatten()
        .collect()
}

/// For an admin: the system broker's OAuth logins (`broker login --system`), with when the
/// current access token expires. Metadata only: the broker never answers with a token.
fn system_logins(socket: &Path) -> Check {
    use crate::system::admin::{self, AdminReply, AdminRequest};
    let name = "system broker logins";
    let credentials = match admin::request(socket, &AdminRequest::List) {
        Ok(AdminReply::Ok { credentials, .. }) => credentials,
        Ok(AdminReply::Error { error }) => return check(name, Status::Fail, error),
        Err(err) => return check(name, Status::Fail, format!("{err:#}")),
    };
    let logins: Vec<String> = credentials
        .iter()
        .filter(|c| c.kind == crate::vault::CredentialKind::OAuth2)
        .map(|c| {
            format!(
                "{} (profile {}{}{})",
                c.provider,
                c.profile,
                c.expires_at
                    .as_deref()
                    .map(|t| format!(
                        ", current access token expires {} UTC",
                        super::credentials::short_time(t)
                    ))
                    .unwrap_or_default(),
                if c.integrity_ok {
                    ""
                } else {
                    ", INTEGRITY CHECK FAILED"
                }
            )
        })
        .collect();
    if logins.is_empty() {
        return check(
            name,
            Status::Skip,
            "none (`broker login <provider> --system` logs it in)",
        );
    }
    let status = if credentials
        .iter()
        .any(|c| c.kind == crate::vault::CredentialKind::OAuth2 && !c.integrity_ok)
    {
        Status::Fail
    } else {
        Status::Ok
    };
    check(name, status, logins.join("; "))
}

/// The proxy this user's broker would reach providers through (never its password).
fn upstream_proxy_check(home: &Home) -> Check {
    match crate::proxy::UpstreamProxy::configured(Some(home)) {
        Ok(Some(proxy)) => check(
            "upstream proxy",
            Status::Ok,
            format!("providers are reached through {proxy}; where an agent's environment names a proxy, broker run adds its managed hosts to the agent's NO_PROXY"),
        ),
        Ok(None) => check(
            "upstream proxy",
            Status::Skip,
            "none: providers are reached directly (HTTPS_PROXY or upstream_proxy in config.toml sets one)",
        ),
        Err(err) => check("upstream proxy", Status::Fail, format!("{err:#}")),
    }
}

fn home_check(home: &Home) -> Check {
    let root = home.root();
    match std::fs::metadata(root) {
        Ok(meta) if meta.permissions().mode() & 0o077 == 0 => check(
            "BROKER_HOME",
            Status::Ok,
            format!("{} (0700)", root.display()),
        ),
        Ok(meta) => check(
            "BROKER_HOME",
            Status::Warn,
            format!(
                "{} is mode {:o}: other users may list it; run chmod 700",
                root.display(),
                meta.permissions().mode() & 0o777
            ),
        ),
        Err(_) => check(
            "BROKER_HOME",
            Status::Skip,
            format!("{} does not exist yet", root.display()),
        ),
    }
}

fn vault_check(home: &Home) -> Check {
    if !Vault::exists(home) {
        return check(
            "vault",
            Status::Skip,
            "no vault yet ('broker add' creates it)",
        );
    }
    let vault = match Vault::open(home) {
        Ok(vault) => vault,
        Err(err) => return check("vault", Status::Fail, err.to_string()),
    };
    match vault.verify() {
        Ok(report) if report.is_ok() => check(
            "vault",
            Status::Ok,
            format!(
                "{} credentials, all intact (integrity checked); master key in the {}",
                report.credentials,
                vault.key_source()
            ),
        ),
        Ok(report) => check(
            "vault",
            Status::Fail,
            format!(
                "failed the integrity check (changed outside broker, or damaged; never used): {}. \
                 Run 'broker remove PROVIDER [--profile NAME]' and 'broker add' (or 'broker login') again for each",
                report.unreadable.join(", ")
            ),
        ),
        Err(err) => check("vault", Status::Fail, err.to_string()),
    }
}

fn audit_check(home: &Home) -> Check {
    let path = home.audit_path();
    // serve and run open it O_NOFOLLOW, as a regular file, or not at all.
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_file() {
            let what = match meta.file_type().is_symlink() {
                true => "a symbolic link",
                false => "not a regular file",
            };
            return check(
                "audit log",
                Status::Fail,
                format!(
                    "{} is {what}: broker serve and broker run will not start until it is one; {}",
                    path.display(),
                    audit::RECOVERY
                ),
            );
        }
    }
    // Keyed lines and the head are checked with the vault's key; without a vault there can
    // only be format-1 (unkeyed) lines.
    let vault = match Vault::exists(home).then(|| Vault::open(home)) {
        None => None,
        Some(Ok(vault)) => Some(vault),
        Some(Err(err)) => {
            return check(
                "audit log",
                Status::Fail,
                format!("cannot check the keyed chain without the vault's key: {err}"),
            )
        }
    };
    if let Some(vault) = &vault {
        // The broker will not start with a log it cannot open or that does not match the
        // vault's head (it uses no credential unaudited).
        match audit::Audit::open(home, vault) {
            Ok(_) => {}
            Err(err @ audit::AuditError::Untrusted { .. }) => {
                return check("audit log", Status::Fail, err.to_string())
            }
            Err(err) => {
                return check(
                    "audit log",
                    Status::Fail,
                    format!(
                        "{err}: broker serve and broker run will not start until it can be opened"
                    ),
                )
            }
        }
    }
    let verified = match &vault {
        Some(vault) => audit::verify_with(&path, vault),
        None => audit::verify(&path, None, None),
    };
    match verified {
        Ok(report) if report.lines == 0 => check("audit log", Status::Skip, "empty"),
        Ok(report) => check("audit log", Status::Ok, report.to_string()),
        Err(broken) => check(
            "audit log",
            Status::Fail,
            format!(
                "broken at line {}: {}; {}",
                broken.line,
                broken.reason,
                audit::RECOVERY
            ),
        ),
    }
}

/// The offline self-test of every client runtime and agent CLI found on this machine.
fn self_tests() -> Vec<Check> {
    let run = || -> anyhow::Result<Vec<Check>> {
        let dir = tempfile::Builder::new()
            .prefix("broker-doctor-")
            .tempdir()?;
        let runtime = super::runtime()?;
        let test = std::sync::Arc::new(runtime.block_on(SelfTest::start(dir.path(), "doctor"))?);
        let mut checks = Vec::new();
        let probes = test.probes();
        let found: Vec<&str> = probes.iter().map(|p| p.name).collect();
        for probe in probes {
            let name = format!("self-test: {}", probe.name);
            let result = test.check(probe);
            checks.push(check(
                name,
                if result.ok { Status::Ok } else { Status::Fail },
                result.detail,
            ));
        }
        let clients = ["curl", "python3", "node", "git", "wget"];
        let agents = crate::selftest::agents::AGENTS.iter().map(|a| a.name);
        for missing in clients
            .into_iter()
            .chain(agents)
            .filter(|n| !found.contains(n))
        {
            // Only curl runs without the shim (pointed at the broker explicitly).
            let why = match crate::launch::which(missing) {
                Some(_) => "libbroker.so not found: only curl runs without it",
                None => "not installed",
            };
            checks.push(check(format!("self-test: {missing}"), Status::Skip, why));
        }
        drop(test);
        drop(runtime);
        Ok(checks)
    };
    run().unwrap_or_else(|err| vec![check("self-test", Status::Fail, format!("{err:#}"))])
}
