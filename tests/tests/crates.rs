//! `cargo install broker-cli` as crates.io would serve it, offline: the workspace's three
//! published crates, as `scripts/package` makes them for a release, are unpacked into a *directory source* (the layout of
//! `cargo vendor`: one directory per crate with its `.cargo-checksum.json`) next to every
//! third-party crate of `Cargo.lock`, and an empty `CARGO_HOME` whose `config.toml` replaces
//! crates-io with that directory installs from it. The lone `broker` it installs runs
//! `broker demo` (a real brokered call, offline) as an ordinary uid in a fresh `HOME`: the
//! shim it starts the agent with is the one its build script built from the *packaged*
//! `broker-shim`, since a registry crate has no `../shim` to reach.
//!
//! The third-party crates come from `scripts/test`, which runs `cargo vendor` (all platforms:
//! the resolver needs the Windows and macOS crates too) into `target/crates-vendor` when
//! `Cargo.lock` changes; the test itself never touches the network.
//!
//! Also here: the broker binary exports none of the shim's hooks. broker-cli depends on
//! broker-shim only so that its build script learns where the shim's sources are; were the
//! shim's rlib linked in, the broker itself would export `connect` and `getaddrinfo`.

use broker_cli::hex::sha256 as sha256_hex;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use broker_integration::{
    as_agent_user, broker_bin, give_to_agent_user, run_bounded, scrub, shim_lib, target_dir,
};

/// What libbroker.so exports (shim/README.md, "Hooks"), none of which the broker may.
const HOOKS: &[&str] = &[
    "getaddrinfo",
    "gethostbyname",
    "gethostbyname_r",
    "gethostbyname2",
    "gethostbyname2_r",
    "connect",
    "__connect",
    "sendto",
    "sendmsg",
    "recvfrom",
    "recvmsg",
    "SSL_CTX_new",
    "SSL_CTX_new_ex",
    "SSL_CTX_set_cert_store",
    "gnutls_certificate_allocate_credentials",
    "execve",
    "execv",
    "execvp",
    "execvpe",
    "execl",
    "execle",
    "execlp",
    "posix_spawn",
    "posix_spawnp",
];

/// The crates the workspace publishes, dependencies first (the order of `cargo publish`).
const PUBLISHED: [&str; 3] = ["broker-contract", "broker-shim", "broker-cli"];

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The dynamic symbols `file` defines, by `nm -D --defined-only` (`which`), or imports
/// (`--undefined-only`).
fn exported(file: &Path) -> Vec<String> {
    dynamic_symbols(file, "--defined-only")
}

fn dynamic_symbols(file: &Path, which: &str) -> Vec<String> {
    let out = Command::new("nm")
        .args(["-D", which])
        .arg(file)
        .output()
        .expect("nm (binutils)");
    assert!(
        out.status.success(),
        "nm {}: {}",
        file.display(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|s| s.split('@').next().unwrap_or(s).to_string())
        .collect()
}

fn assert_exports_no_hook(binary: &Path) {
    let symbols = exported(binary);
    let leaked: Vec<&&str> = HOOKS
        .iter()
        .filter(|h| symbols.iter().any(|s| s == *h))
        .collect();
    assert!(
        leaked.is_empty(),
        "{} exports the shim's {leaked:?}: broker-shim's rlib was linked into it",
        binary.display()
    );
}

#[test]
fn the_broker_binary_exports_none_of_the_shims_hooks() {
    // The control: the check sees the hooks where they are.
    let shim = exported(&shim_lib());
    for hook in HOOKS {
        assert!(shim.iter().any(|s| s == hook), "libbroker.so lacks {hook}");
    }
    assert_exports_no_hook(&broker_bin());
    // An executable exports nothing unless asked, so the hooks could hide inside it: its own
    // `connect` must still be libc's, imported, not one linked in from the shim.
    let imported = dynamic_symbols(&broker_bin(), "--undefined-only");
    assert!(
        imported.iter().any(|s| s == "connect"),
        "broker does not import connect from libc: {imported:?}"
    );
}

/// The workspace checkout (`tests/..`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// `cargo` for `dir`, with none of the variables `cargo test` set for this test (nor the
/// developer's cargo configuration by environment).
fn cargo(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CARGO_") {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(dir).stdin(Stdio::null());
    cmd
}

/// `scripts/test`'s `cargo vendor` of `Cargo.lock`, or why it is not there.
fn vendored_crates() -> Result<PathBuf, String> {
    let target = target_dir().parent().expect("target").to_path_buf();
    if let Ok(reason) = std::fs::read_to_string(target.join("crates-vendor-skipped")) {
        return Err(reason.trim().to_string());
    }
    let vendor = std::env::var_os("BROKER_TEST_CRATES_VENDOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("crates-vendor"));
    assert!(
        std::fs::read_dir(&vendor).is_ok_and(|mut d| d.next().is_some()),
        "{} is missing: run ./scripts/test (it vendors Cargo.lock's crates there, once), or \
         `cargo vendor --locked --versioned-dirs {}`",
        vendor.display(),
        vendor.display()
    );
    Ok(vendor)
}

/// `scripts/package --crates-only`: the `.crate` files a release publishes, into `out`.
fn package(out: &Path) -> Vec<PathBuf> {
    let mut cmd = Command::new(workspace().join("scripts/package"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CARGO_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(["--crates-only", "--out"])
        .arg(out)
        .stdin(Stdio::null());
    let done = run_bounded(&mut cmd, Duration::from_secs(300));
    assert!(done.status.success(), "scripts/package: {}", text(&done));
    eprintln!(
        "scripts/package --crates-only: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    PUBLISHED
        .iter()
        .map(|name| {
            out.join("crates")
                .join(format!("{name}-{}.crate", env!("CARGO_PKG_VERSION")))
        })
        .collect()
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path, prefix: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, &prefix.join(entry.file_name()), into);
        } else {
            into.push(prefix.join(entry.file_name()));
        }
    }
}

/// `crate_file` unpacked into `registry` as `cargo vendor` would leave it: the files, and a
/// `.cargo-checksum.json` with each file's SHA-256 and the `.crate`'s (which the packaged
/// `Cargo.lock` of broker-cli names for its two siblings).
fn unpack_into(registry: &Path, crate_file: &Path) {
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(crate_file)
        .arg("-C")
        .arg(registry)
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar: {}", text(&out));
    let name = crate_file.file_stem().expect("name");
    let dir = registry.join(name);
    let mut files = Vec::new();
    files_under(&dir, Path::new(""), &mut files);
    let files: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(f)).expect("read");
            (f.display().to_string(), sha256_hex(&bytes).into())
        })
        .collect();
    let package = sha256_hex(&std::fs::read(crate_file).expect("crate"));
    let checksum = serde_json::json!({ "files": files, "package": package });
    std::fs::write(dir.join(".cargo-checksum.json"), checksum.to_string()).expect("checksum");
}

/// Our crates' artifacts in the shared install target directory, so they are built again from
/// the sources just packaged. Cargo takes a registry crate of the same version for unchanged
/// (crates.io versions never change), so it would otherwise reuse the last run's build. The
/// third-party crates' builds are kept: that is what makes a second run quick.
fn forget_our_builds(install_target: &Path) {
    for sub in [".fingerprint", "build", "deps"] {
        let Ok(entries) = std::fs::read_dir(install_target.join("debug").join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("broker") || name.starts_with("libbroker") {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
}

#[test]
fn cargo_install_broker_cli_from_its_packaged_crates_runs_the_demo() {
    let vendor = match vendored_crates() {
        Ok(vendor) => vendor,
        Err(reason) => {
            broker_integration::skip(&format!("cargo install from a local registry: {reason}"));
            return;
        }
    };
    let work = target_dir().parent().expect("target").join("crates-test");
    let started = Instant::now();
    let crates = package(&work.join("dist"));

    // The registry: the vendored crates (linked, they are large) and ours, unpacked.
    let registry = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&vendor).expect("vendor").flatten() {
        if entry.path().is_dir() {
            std::os::unix::fs::symlink(entry.path(), registry.path().join(entry.file_name()))
                .expect("link");
        }
    }
    for crate_file in &crates {
        unpack_into(registry.path(), crate_file);
    }
    let cargo_home = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        cargo_home.path().join("config.toml"),
        format!(
            "[source.crates-io]\nreplace-with = \"packaged\"\n\n[source.packaged]\ndirectory = \"{}\"\n",
            registry.path().display()
        ),
    )
    .expect("config.toml");

    // --debug, and without debug info: a release build of ~200 crates takes several times as
    // long on CI's two cores; the profile changes nothing of what is tested (where the shim's
    // sources come from, what is linked, what is installed). The target directory is kept
    // between runs for the third-party crates only (forget_our_builds).
    let install_target = work.join("install-target");
    forget_our_builds(&install_target);
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut install = cargo(root.path());
    install
        .env("CARGO_HOME", cargo_home.path())
        .env("CARGO_TARGET_DIR", &install_target)
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .args([
            "install",
            "broker-cli",
            "--offline",
            "--locked",
            "--debug",
            "--root",
        ])
        .arg(root.path().join("installed"));
    let installed = run_bounded(&mut install, Duration::from_secs(60 * 60));
    assert!(
        installed.status.success(),
        "cargo install: {}",
        text(&installed)
    );
    eprintln!(
        "cargo package + cargo install broker-cli (debug): {:.0?}",
        started.elapsed()
    );
    // The registry's sources are left as they were: the nested build of the shim ran on a copy.
    for crate_file in &crates {
        let dir = registry.path().join(crate_file.file_stem().expect("name"));
        let sums: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(".cargo-checksum.json")).expect("checksums"),
        )
        .expect("json");
        let mut now = Vec::new();
        files_under(&dir, Path::new(""), &mut now);
        for file in &now {
            let name = file.display().to_string();
            if name == ".cargo-checksum.json" {
                continue;
            }
            let bytes = std::fs::read(dir.join(file)).expect("read");
            assert_eq!(
                sums["files"][&name].as_str(),
                Some(sha256_hex(&bytes).as_str()),
                "{} was written by the build",
                dir.join(file).display()
            );
        }
        assert_eq!(
            now.len(),
            sums["files"].as_object().expect("files").len() + 1
        );
    }
    let log = String::from_utf8_lossy(&installed.stderr);
    for name in PUBLISHED {
        assert!(
            log.contains(&format!("Compiling {name} v")),
            "{name} was not built from its package:\n{log}"
        );
    }

    // One file: the broker, with the shim inside and none of its hooks exported.
    let bin = root.path().join("installed/bin");
    let listed: Vec<_> = std::fs::read_dir(&bin)
        .expect("bin")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(listed, ["broker"], "{}", bin.display());
    let broker = bin.join("broker");
    assert_exports_no_hook(&broker);

    // `broker demo` as an ordinary uid, in a fresh HOME: the shim written to its cache.
    let home = root.path().join("home");
    std::fs::create_dir(&home).expect("home");
    give_to_agent_user(&home);
    let mut demo = Command::new(&broker);
    scrub(&mut demo);
    demo.arg("demo")
        .env("HOME", &home)
        .env_remove("BROKER_HOME")
        .env_remove("BROKER_SHIM_LIB")
        .env_remove("XDG_CACHE_HOME")
        .current_dir(&home);
    let mut demo = as_agent_user(&demo);
    demo.stdin(Stdio::null());
    let out = run_bounded(&mut demo, Duration::from_secs(120));
    let said = text(&out);
    assert!(out.status.success(), "broker demo: {said}");
    assert!(
        said.contains("LD_PRELOAD=libbroker.so")
            && said.contains("ok: the origin got the real key"),
        "{said}"
    );
    let cache = home.join(".cache/broker");
    let shims: Vec<_> = std::fs::read_dir(&cache)
        .unwrap_or_else(|e| panic!("{}: {e}: the demo did not write its shim", cache.display()))
        .flatten()
        .map(|e| e.path().join("libbroker.so"))
        .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let hooks = exported(&shims[0]);
    assert!(
        HOOKS.iter().all(|h| hooks.iter().any(|s| s == h)),
        "{hooks:?}"
    );
}
