//! With the `embedded-shim` feature (on by default, so `cargo install --path broker` has it),
//! builds `libbroker.so` from `../shim` and hands its path to the crate as
//! `BROKER_EMBEDDED_SHIM`, which `src/embedded_shim.rs` includes. Stable cargo installs no
//! cdylib, so a broker installed on its own carries its shim inside and writes it out at run
//! time.
//!
//! The shim is built by a nested `cargo build` with a target directory of its own under
//! `OUT_DIR`: the outer cargo holds the lock of its own target directory for the whole build,
//! so sharing it would deadlock. The nested build is the shim and its three small dependencies
//! (about 9 CPU-seconds), shares the outer build's jobserver (`CARGO_MAKEFLAGS` is passed on)
//! and is incremental after the first time.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_EMBEDDED_SHIM").is_none() {
        return;
    }
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("the broker crate sits in the workspace")
        .to_path_buf();
    let shim_manifest = workspace.join("shim/Cargo.toml");
    if !shim_manifest.is_file() {
        panic!(
            "the `embedded-shim` feature builds libbroker.so from the shim's sources, expected at {}: \
             build from the repository (cargo install --path broker), or build without it \
             (--no-default-features) and install libbroker.so next to the broker binary yourself",
            shim_manifest.display()
        );
    }
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

    let out_dir = PathBuf::from(env("OUT_DIR"));
    let target_dir = out_dir.join("shim-target");
    let target = env("TARGET");
    let release = env("PROFILE") == "release";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--lib", "-p", "broker-shim", "--manifest-path"])
        .arg(&shim_manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--target", &target]);
    if release {
        cmd.arg("--release");
    }
    if std::env::var_os("CARGO_NET_OFFLINE").is_some_and(|v| v == "true") {
        cmd.arg("--offline");
    }
    // What cargo tells this build script about the broker crate would be misread by the
    // nested cargo as its own configuration (`CARGO_TARGET_DIR` above all).
    for (name, _) in std::env::vars_os() {
        if is_outer_only(&name) {
            cmd.env_remove(&name);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot start cargo to build the embedded shim: {e}"));
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

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

/// Variables cargo sets for this build script only (or the outer build's target choice).
fn is_outer_only(name: &OsString) -> bool {
    let name = name.to_string_lossy();
    [
        "CARGO_FEATURE_",
        "CARGO_CFG_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
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
