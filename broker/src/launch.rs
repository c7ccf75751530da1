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

/// `libbroker.so`: `$BROKER_SHIM_LIB`, else next to the `broker` binary, else in
/// `../lib` or `../lib/broker` relative to it (the layouts of `cargo build` and of packages).
pub fn find_shim() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(ENV_SHIM_LIB).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
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

/// Make `command` load the shim with the run's config. An existing `LD_PRELOAD` is kept,
/// after ours.
pub fn preload(command: &mut Command, lib: &Path, shim_config: &Path) {
    command.env(
        "LD_PRELOAD",
        prepend_preload(lib, std::env::var_os("LD_PRELOAD")),
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
}
