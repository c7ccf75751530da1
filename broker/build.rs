//! With the `embedded-shim` feature (on by default, so `cargo install` has it), builds
//! `libbroker.so` from the shim's sources and hands its path to the crate as
//! `BROKER_EMBEDDED_SHIM`, which `src/embedded_shim.rs` includes. Stable cargo installs no
//! cdylib, so a broker installed on its own carries its shim inside and writes it out at run
//! time.
//!
//! The sources come from the `broker-shim` dependency: its `links = "broker_shim"` build script
//! says where its manifest directory is, which cargo hands to this script as
//! `DEP_BROKER_SHIM_SRC`: `shim/` in a checkout, the unpacked `broker-shim-V/` of the registry
//! for `cargo install broker-cli`. That dependency's rlib is never linked into the binary
//! (nothing names the crate; tests/tests/crates.rs checks the binary's exported symbols), and it
//! makes cargo download the shim's dependencies before this script runs.
//!
//! Rejected: artifact dependencies (`-Z bindeps`, which would hand over the built `.so`) are
//! nightly-only; carrying the shim's sources inside this crate's package fails because
//! `cargo package` leaves out any subdirectory with a `Cargo.toml`, and the shim would need
//! the contract's sources too; `cargo metadata` from this script would resolve the whole graph
//! a second time, against the index.
//!
//! The shim is built by a nested `cargo build` with a target directory of its own under
//! `OUT_DIR`: the outer cargo holds the lock of its own target directory for the whole build,
//! so sharing it would deadlock. The nested build is the shim and its three small dependencies
//! (about 9 CPU-seconds), shares the outer build's jobserver (`CARGO_MAKEFLAGS` is passed on),
//! is incremental after the first time, and is `--offline` first: everything it needs was
//! downloaded for the outer build, and a build the user started offline must stay so. In a
//! checkout it builds with Cargo.lock's versions (`--locked`); `cargo install --path broker`
//! without `--locked` downloads the newest versions instead, so when the offline build fails
//! there for want of a pinned version, it is tried once more online (not with
//! `CARGO_NET_OFFLINE=true`).
//!
//! - Checkout: `cargo build -p broker-shim --locked` in its workspace (its `Cargo.lock`).
//! - Packaged (`cargo package` left a `Cargo.toml.orig` beside the manifest): registry sources
//!   must not be written, so the crate is copied to `OUT_DIR`, made a workspace of its own and
//!   built there, with this crate's packaged `Cargo.lock` (the versions `cargo install --locked`
//!   used) when every version it names is at hand, else the newest versions already downloaded.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_EMBEDDED_SHIM").is_none() {
        return;
    }
    let shim_dir = PathBuf::from(env("DEP_BROKER_SHIM_SRC"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let target = env("TARGET");
    let release = env("PROFILE") == "release";

    let packaged = shim_dir.join("Cargo.toml.orig").is_file();
    let (dir, manifest, locked) = if packaged {
        let manifest = standalone_copy(&shim_dir, &out_dir.join("shim-src"));
        let dir = manifest
            .parent()
            .expect("a manifest has a directory")
            .to_path_buf();
        (dir, manifest, false)
    } else {
        let workspace = shim_dir.parent().expect("shim/ sits in the workspace");
        for input in [
            "shim/src",
            "shim/build.rs",
            "shim/Cargo.toml",
            "shim/execl.map",
            "contract/src",
            "contract/Cargo.toml",
            "Cargo.lock",
        ] {
            println!("cargo:rerun-if-changed={}", workspace.join(input).display());
        }
        (workspace.to_path_buf(), shim_dir.join("Cargo.toml"), true)
    };

    let target_dir = out_dir.join("shim-target");
    let nested = |offline: bool| {
        let mut cmd = cargo(&dir);
        cmd.args(["build", "--lib"]);
        if locked {
            cmd.args(["--locked", "-p", "broker-shim"]);
        }
        if offline {
            cmd.arg("--offline");
        }
        cmd.arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target_dir)
            .args(["--target", &target]);
        if release {
            cmd.arg("--release");
        }
        cmd
    };
    let run = |mut cmd: Command| {
        cmd.status()
            .unwrap_or_else(|e| panic!("cannot start cargo to build the embedded shim: {e}"))
    };
    // Offline first, its errors kept to tell why it failed (and shown as they are).
    let first = nested(true)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot start cargo to build the embedded shim: {e}"));
    let _ = std::io::Write::write_all(&mut std::io::stderr(), &first.stderr);
    let mut status = first.status;
    // A checkout built by `cargo install --path broker` without `--locked` resolved the newest
    // versions, not Cargo.lock's, so the shim's pinned ones may not be downloaded: build once
    // more online, unless the user asked for no network. Only for that: cargo names offline
    // mode when a crate is missing, and a failure of the code itself built a second time would
    // only print the same errors twice.
    let offline_asked = std::env::var_os("CARGO_NET_OFFLINE").is_some_and(|v| v == "true");
    let for_want_of_a_crate = String::from_utf8_lossy(&first.stderr).contains("offline");
    if !status.success() && locked && !offline_asked && for_want_of_a_crate {
        status = run(nested(false));
    }
    if !status.success() {
        panic!("building the embedded libbroker.so failed ({status}); see cargo's output above");
    }

    let profile_dir = if release { "release" } else { "debug" };
    let built = target_dir
        .join(&target)
        .join(profile_dir)
        .join("libbroker.so");
    // A copy, so the nested target directory's next build cannot change what was included.
    let embedded = out_dir.join("libbroker.so");
    std::fs::copy(&built, &embedded)
        .unwrap_or_else(|e| panic!("the nested build left no {}: {e}", built.display()));
    println!(
        "cargo:rustc-env=BROKER_EMBEDDED_SHIM={}",
        embedded.display()
    );
}

/// The packaged shim at `src`, copied to `dest` (emptied first) as a workspace of its own, with
/// a `Cargo.lock` when the one this crate was packaged with can be used offline. Returns the
/// copy's manifest.
fn standalone_copy(src: &Path, dest: &Path) -> PathBuf {
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .unwrap_or_else(|e| panic!("cannot empty {}: {e}", dest.display()));
    }
    copy_tree(src, dest);
    let manifest = dest.join("Cargo.toml");
    // Without it, cargo would take a workspace above OUT_DIR (a checkout's, when the target
    // directory is inside one) for the shim's and refuse to build.
    let mut text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", manifest.display()));
    text.push_str("\n[workspace]\n");
    write(&manifest, text.as_bytes());

    let lock = dest.join("Cargo.lock");
    let packaged_lock = PathBuf::from(env("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    if let Ok(bytes) = std::fs::read(&packaged_lock) {
        write(&lock, &bytes);
        // `cargo fetch --offline` fails when a locked version is not downloaded: an install
        // without --locked resolved newer ones, which are.
        let usable = cargo(dest)
            .args(["fetch", "--offline", "--target", &env("TARGET")])
            .arg("--manifest-path")
            .arg(&manifest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !usable {
            let _ = std::fs::remove_file(&lock);
        }
    } else {
        let _ = std::fs::remove_file(&lock);
    }
    manifest
}

fn copy_tree(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dest.display()));
    let entries = std::fs::read_dir(src)
        .unwrap_or_else(|e| panic!("cannot read the shim's sources at {}: {e}", src.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        if from.is_dir() {
            copy_tree(&from, &to);
        } else {
            std::fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", from.display()));
        }
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The cargo running this build, in `dir`, without what cargo told this script about the
/// broker crate: the nested cargo would misread it as its own configuration
/// (`CARGO_TARGET_DIR` above all).
fn cargo(dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(dir);
    for (name, _) in std::env::vars_os() {
        if is_outer_only(&name) {
            cmd.env_remove(&name);
        }
    }
    cmd
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for this build script"))
}

/// Variables cargo sets for this build script only (or the outer build's target choice).
fn is_outer_only(name: &OsString) -> bool {
    let name = name.to_string_lossy();
    [
        "CARGO_FEATURE_",
        "CARGO_CFG_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "DEP_",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || matches!(
            name.as_ref(),
            "CARGO_TARGET_DIR"
                | "CARGO_BUILD_TARGET"
                | "CARGO_BUILD_TARGET_DIR"
                | "CARGO_PRIMARY_PACKAGE"
                | "OUT_DIR"
                | "TARGET"
                | "HOST"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "NUM_JOBS"
                | "RUSTC_LINKER"
        )
}
