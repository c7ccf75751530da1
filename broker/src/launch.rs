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

/// Variables that name a CA bundle, set for a program routed through the CONNECT listener.
pub const CA_BUNDLE_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "AWS_CA_BUNDLE",
];

/// The system bundle the merged bundle starts from: `$SSL_CERT_FILE` when set, else Debian's.
fn system_bundle() -> Option<Vec<u8>> {
    let configured = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    configured
        .into_iter()
        .chain([
            PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt"),
        ])
        .find_map(|p| std::fs::read(p).ok())
}

/// For a program the shim cannot reach: send its https through the run's CONNECT listener and
/// make it trust the run CA through a bundle that also keeps the system roots (so unmanaged
/// hosts, tunnelled untouched, still verify).
pub fn via_connect_proxy(
    command: &mut Command,
    proxy_addr: &str,
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
    let url = format!("http://{proxy_addr}");
    command.env("HTTPS_PROXY", &url).env("https_proxy", &url);
    command.env_remove("LD_PRELOAD").env_remove(ENV_SHIM_CONFIG);
    Ok(())
}

/// Whether a program can take `libbroker.so` (a glibc build) in `LD_PRELOAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A dynamically linked glibc program (or a script run by one).
    Glibc,
    /// Static, musl, or otherwise not a glibc program: preloading would do nothing or make it
    /// fail to start; it gets the proxy variables instead.
    NotPreloadable(String),
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
    let Ok(bytes) = read_head(path, 64 * 1024) else {
        return Target::Glibc;
    };
    if bytes.starts_with(b"#!") && depth < 4 {
        let line = bytes[2..].split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let Some(interp) = words.next() else {
            return Target::Glibc;
        };
        let interp = if interp.ends_with("/env") {
            match words.find(|w| !w.starts_with('-')).and_then(which) {
                Some(p) => p,
                None => return Target::Glibc,
            }
        } else {
            PathBuf::from(interp)
        };
        return inspect_file(&interp, depth + 1);
    }
    match elf_interpreter(&bytes) {
        ElfInterp::NotElf => Target::Glibc,
        ElfInterp::Static => {
            Target::NotPreloadable(format!("{} is statically linked", path.display()))
        }
        ElfInterp::Path(interp) if interp.contains("ld-musl") => {
            Target::NotPreloadable(format!("{} is a musl program", path.display()))
        }
        ElfInterp::Path(_) => Target::Glibc,
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

#[derive(Debug, PartialEq, Eq)]
enum ElfInterp {
    NotElf,
    Static,
    Path(String),
}

/// The `PT_INTERP` of a 64-bit little-endian ELF image (the only kind this shim is built for).
fn elf_interpreter(bytes: &[u8]) -> ElfInterp {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return ElfInterp::NotElf;
    }
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok())
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return ElfInterp::NotElf;
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) == Some(PT_INTERP) {
            let (Some(offset), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
                break;
            };
            let Some(raw) = bytes.get(offset..offset + size) else {
                break;
            };
            let text = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_string();
            return ElfInterp::Path(text);
        }
    }
    ElfInterp::Static
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
    fn static_and_non_elf_images() {
        assert_eq!(elf_interpreter(b"not an elf"), ElfInterp::NotElf);
        // A minimal ELF64 header with no program headers: static.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        assert_eq!(elf_interpreter(&elf), ElfInterp::Static);
        let sh = std::fs::read("/bin/sh").expect("read /bin/sh");
        assert!(matches!(elf_interpreter(&sh), ElfInterp::Path(p) if p.contains("ld-linux")));
    }
}
