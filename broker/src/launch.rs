//! Starting an agent under the shim: finding `libbroker.so`, and the environment that makes
//! a child process use the broker (`LD_PRELOAD` prepended, never replaced, and the path of
//! the run's shim config).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use broker_contract::ENV_SHIM_CONFIG;

/// Overrides where `libbroker.so` is looked for.
pub const ENV_SHIM_LIB: &str = "BROKER_SHIM_LIB";
/// The shim's file name.
pub const SHIM_FILE: &str = "libbroker.so";

/// Where the shim that `find_shim` returns came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimOrigin {
    /// `$BROKER_SHIM_LIB`.
    Env,
    /// Installed beside the broker binary.
    Installed,
    /// Carried inside the broker binary, written out and verified (`embedded_shim`).
    Embedded,
}

/// `libbroker.so`: `$BROKER_SHIM_LIB`, else next to the `broker` binary, else in `../lib` or
/// `../lib/broker` relative to it (the layouts of `cargo build` and of packages), else the
/// copy carried inside this binary, written out and verified. An error only from the last.
pub fn locate_shim() -> anyhow::Result<Option<(PathBuf, ShimOrigin)>> {
    if let Some(path) = std::env::var_os(ENV_SHIM_LIB).filter(|p| !p.is_empty()) {
        return Ok(Some(PathBuf::from(path))
            .filter(|p| p.is_file())
            .map(|p| (p, ShimOrigin::Env)));
    }
    if let Some(path) = installed_shim() {
        return Ok(Some((path, ShimOrigin::Installed)));
    }
    Ok(crate::embedded_shim::extract()?.map(|p| (p, ShimOrigin::Embedded)))
}

/// `locate_shim`'s path; a failure to write out the embedded shim is said on stderr.
pub fn find_shim() -> Option<PathBuf> {
    match locate_shim() {
        Ok(found) => found.map(|(path, _)| path),
        Err(err) => {
            eprintln!(
                "broker: the libbroker.so inside this binary could not be written out: {err:#}"
            );
            None
        }
    }
}

fn installed_shim() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join(SHIM_FILE),
        dir.join("../lib").join(SHIM_FILE),
        dir.join("../lib/broker").join(SHIM_FILE),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Variables of the broker's own that an agent must never inherit.
pub const BROKER_ONLY_VARS: &[&str] = &["BROKER_PASSPHRASE"];

/// Remove the broker's own secrets from an agent's environment.
pub fn scrub_broker_secrets(command: &mut Command) {
    for var in BROKER_ONLY_VARS {
        command.env_remove(var);
    }
}

/// Make `command` load the shim with the run's config. An existing `LD_PRELOAD` is kept,
/// after ours.
pub fn preload(command: &mut Command, lib: &Path, shim_config: &Path) {
    command.env(
        "LD_PRELOAD",
        prepend_preload(lib, crate::hardening::original_preload()),
    );
    command.env(ENV_SHIM_CONFIG, shim_config);
}

/// `lib` first, then the entries already in `existing` (without a duplicate of `lib`).
pub fn prepend_preload(lib: &Path, existing: Option<OsString>) -> OsString {
    let mut out = OsString::from(lib.as_os_str());
    if let Some(existing) = existing {
        let existing = existing.to_string_lossy().into_owned();
        for entry in existing.split([' ', ':']).filter(|e| !e.is_empty()) {
            if Path::new(entry) != lib {
                out.push(":");
                out.push(entry);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_is_prepended_never_replaced() {
        let lib = Path::new("/opt/broker/libbroker.so");
        assert_eq!(prepend_preload(lib, None), "/opt/broker/libbroker.so");
        assert_eq!(
            prepend_preload(
                lib,
                Some("/usr/lib/libjemalloc.so /opt/broker/libbroker.so".into())
            ),
            "/opt/broker/libbroker.so:/usr/lib/libjemalloc.so"
        );
    }

    #[test]
    fn managed_hosts_join_no_proxy_only_when_a_proxy_is_set() {
        let hosts = [
            "api.openai.com".to_string(),
            "*.openai.azure.com".to_string(),
        ];
        let no_proxy_of = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut command = Command::new("true");
            exempt_managed_hosts(&mut command, &hosts, &|name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
            });
            let get = |name: &str| {
                command
                    .get_envs()
                    .find(|(k, _)| *k == name)
                    .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
            };
            let (upper, lower) = (get("NO_PROXY"), get("no_proxy"));
            assert_eq!(upper, lower);
            upper
        };
        assert_eq!(no_proxy_of(&[]), None);
        assert_eq!(no_proxy_of(&[("HTTPS_PROXY", "")]), None);
        assert_eq!(
            no_proxy_of(&[("https_proxy", "http://corp:3128")]).as_deref(),
            Some("api.openai.com,.openai.azure.com")
        );
        assert_eq!(
            no_proxy_of(&[
                ("ALL_PROXY", "http://corp:3128"),
                ("NO_PROXY", "localhost, api.openai.com,.corp")
            ])
            .as_deref(),
            Some("localhost,api.openai.com,.corp,.openai.azure.com")
        );
    }
}

pub use broker_contract::CA_BUNDLE_VARS;

/// The system bundle the merged bundle starts from: `$SSL_CERT_FILE` when set, else the
/// distribution's.
fn system_bundle() -> Option<Vec<u8>> {
    let configured = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    configured
        .into_iter()
        .chain(
            broker_contract::SYSTEM_CA_BUNDLES
                .iter()
                .filter_map(|p| p.to_str().ok())
                .map(PathBuf::from),
        )
        .find_map(|p| std::fs::read(p).ok())
}

/// For a program the shim cannot reach: send its https through the run's CONNECT listener and
/// make it trust the run CA through a bundle that also keeps the system roots (so unmanaged
/// hosts, tunnelled untouched, still verify).
///
/// The proxy URL carries the run's ticket as its password (`http://broker:<ticket>@addr`):
/// curl, wget, git, Python (requests, httpx, aiohttp) and Go send it as `Proxy-Authorization:
/// Basic` on CONNECT, which the listener requires. It is in the child's environment, which
/// only the child's own tree (and the user, outside a sandbox) can read, like the shim config.
///
/// The shim's exec hooks give the same variables to such a program started from inside a run
/// (`shim/src/hooks/exec.rs`).
pub fn via_connect_proxy(
    command: &mut Command,
    proxy_addr: &str,
    ticket: Option<&broker_contract::Ticket>,
    run_ca: &Path,
    dir: &Path,
) -> std::io::Result<()> {
    let mut bundle = system_bundle().unwrap_or_default();
    if !bundle.ends_with(b"\n") && !bundle.is_empty() {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(&std::fs::read(run_ca)?);
    let path = dir.join("ca-bundle.pem");
    crate::home::write_private_file(&path, &bundle)?;
    for var in CA_BUNDLE_VARS {
        command.env(var, &path);
    }
    let url = broker_contract::connect_proxy_url(proxy_addr, ticket);
    command.env("HTTPS_PROXY", &url).env("https_proxy", &url);
    // No host may skip the broker's listener: a managed host in NO_PROXY (as
    // `exempt_managed_hosts` puts them there for preloaded programs) would go out directly with
    // the placeholder. The listener tunnels the hosts it does not manage directly, which is
    // what the user's own NO_PROXY entries asked for.
    command.env_remove("NO_PROXY").env_remove("no_proxy");
    Ok(())
}

/// The proxy variables that send a client's https through a proxy.
const PROXY_VARS: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"];

/// For a preloaded program whose environment names a proxy (a corporate `HTTPS_PROXY` from the
/// user's shell): add the run's managed hosts to `NO_PROXY` and `no_proxy`. Otherwise the
/// program would send a managed host's request to that proxy (a CONNECT the shim never sees,
/// to a host it never resolves), and the provider would get the placeholder. With them
/// exempted, managed hosts reach the broker and everything else still goes to the proxy.
/// The broker's own proxy setting (`upstream_proxy`) is never put here.
///
/// `*.example.com` becomes `.example.com`, which clients (curl, Python, Go, Node's
/// `NODE_USE_ENV_PROXY`) read as every name under it: a little wider than the pattern's one
/// label, so such a name the run does not manage also skips the proxy.
pub fn exempt_managed_hosts(
    command: &mut Command,
    hosts: &[String],
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) {
    let set = |name: &str| env(name).is_some_and(|v| !v.is_empty());
    if hosts.is_empty() || !PROXY_VARS.iter().any(|v| set(v)) {
        return;
    }
    let existing = env("no_proxy")
        .filter(|v| !v.is_empty())
        .or_else(|| env("NO_PROXY"))
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut entries: Vec<String> = existing
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    for host in hosts {
        let entry = match host.strip_prefix('*') {
            Some(domain) => domain.to_string(),
            None => host.clone(),
        };
        if !entry.is_empty() && !entries.contains(&entry) {
            entries.push(entry);
        }
    }
    let value = entries.join(",");
    command.env("NO_PROXY", &value).env("no_proxy", &value);
}

/// Make `command` (whose program is `target`) use the run of `shim_config`, as `broker run`
/// does: `libbroker.so` preloaded for a glibc program; for one the shim cannot reach, the
/// run's CONNECT listener and a CA bundle (with the preload kept where it is harmless, for the
/// program's glibc children). Returns the line to tell the user in the second case.
pub fn attach(
    command: &mut Command,
    target: &Target,
    shim: Option<&Path>,
    shim_config: &broker_contract::ShimConfig,
    shim_config_path: &Path,
) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    match (target, shim) {
        (Target::Glibc, Some(lib)) => {
            preload(command, lib, shim_config_path);
            exempt_managed_hosts(command, &shim_config.hosts, &|name| std::env::var_os(name));
            Ok(None)
        }
        (Target::Glibc, None) => anyhow::bail!(
            "libbroker.so not found next to the broker binary (or in $BROKER_SHIM_LIB), and this broker carries none inside (or could not write it out, see above): build the workspace ('cargo build --workspace'), install with 'cargo install --path broker', or set BROKER_SHIM_LIB"
        ),
        (Target::NotPreloadable { why, keep_preload }, _) => {
            // The glibc shim would crash a musl program and do nothing for a static or Go one:
            // such a program goes through the CONNECT listener instead.
            let proxy = shim_config
                .connect_proxy
                .as_deref()
                .context("the broker offers no CONNECT listener")?;
            let dir = shim_config_path.parent().unwrap_or(Path::new("."));
            match (keep_preload, shim) {
                (true, Some(lib)) => preload(command, lib, shim_config_path),
                _ => {
                    command
                        .env_remove("LD_PRELOAD")
                        .env_remove(ENV_SHIM_CONFIG);
                }
            }
            via_connect_proxy(command, proxy, shim_config.ticket.as_ref(), &shim_config.ca_file, dir)?;
            Ok(Some(format!(
                "{why}: it cannot take libbroker.so, so it gets HTTPS_PROXY={proxy} and a CA bundle instead"
            )))
        }
    }
}

/// Whether a program can take `libbroker.so` (a glibc build) in `LD_PRELOAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A dynamically linked glibc program (or a script run by one).
    Glibc,
    /// Static, musl, Go, or otherwise out of the shim's reach: it gets the proxy variables.
    NotPreloadable {
        /// What the program is, for the one line `broker run` prints.
        why: String,
        /// `LD_PRELOAD` stays, for the program's glibc children: a static or Go program
        /// ignores it (or loads it harmlessly), while a dynamic musl program would fail to
        /// start with a glibc library in it.
        keep_preload: bool,
    },
}

/// Look at `program` (resolved on `PATH`), following `#!` to the interpreter.
pub fn inspect_target(program: &Path) -> Target {
    let resolved = if program.components().count() > 1 {
        Some(program.to_path_buf())
    } else {
        which(&program.to_string_lossy())
    };
    let Some(path) = resolved else {
        // Not found: the spawn will fail with a clear error; nothing to decide.
        return Target::Glibc;
    };
    inspect_file(&path, 0)
}

fn inspect_file(path: &Path, depth: u8) -> Target {
    use broker_contract::elf::{self, Reach, Unreachable};
    let Ok(head) = read_head(path, elf::HEAD_BYTES as u64) else {
        return Target::Glibc;
    };
    let unreachable = match elf::reach(&head) {
        Reach::Script { interp, arg } if depth < 4 => {
            let interp = PathBuf::from(String::from_utf8_lossy(interp).into_owned());
            let interp = if interp.ends_with("env") {
                match arg
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .and_then(|a| which(&a))
                {
                    Some(p) => p,
                    None => return Target::Glibc,
                }
            } else {
                interp
            };
            return inspect_file(&interp, depth + 1);
        }
        // glibc programs, and anything unrecognised: the preload is harmless there.
        Reach::Script { .. } | Reach::Preload => return Target::Glibc,
        Reach::Proxy(unreachable) => unreachable,
    };
    let why = match unreachable {
        Unreachable::Static => format!("{} is statically linked", path.display()),
        Unreachable::Go => format!(
            "{} is a Go program (it makes its own system calls)",
            path.display()
        ),
        Unreachable::Loader(interp) => format!(
            "{} is linked against {} (not glibc)",
            path.display(),
            String::from_utf8_lossy(elf::basename(interp))
        ),
    };
    Target::NotPreloadable {
        why,
        keep_preload: unreachable.keeps_preload(),
    }
}

fn read_head(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn system_programs_are_glibc_and_scripts_follow_their_interpreter() {
        assert_eq!(inspect_target(Path::new("sh")), Target::Glibc);
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/usr/bin/env sh\necho hi\n").expect("write");
        assert_eq!(inspect_target(&script), Target::Glibc);
    }

    #[test]
    fn static_programs_cannot_be_preloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A minimal ELF64 header with no program headers: static.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let path = dir.path().join("static");
        std::fs::write(&path, elf).expect("write");
        assert!(
            matches!(inspect_target(&path), Target::NotPreloadable { why, keep_preload: true } if why.contains("statically linked"))
        );
    }
}
