//! The broker never runs with a library the agent could have written preloaded into it: it
//! starts itself again without `LD_PRELOAD` (broker/src/hardening.rs). The one exception is
//! valgrind's own preloads, root-installed, which `scripts/bench-instructions` needs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use broker_integration::{run_bounded, which, Home};

const KEY: &str = "sk-test-real-openai-key-for-preload-0123456789";

/// A library whose destructor appends the pid to `$PRELOAD_MARKER`: it runs only if the
/// library is still loaded when the process exits normally, i.e. in the image that ran
/// `main` to the end (an `execve` discards the old image without running destructors).
fn build_marker_lib(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join("marker.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((destructor)) static void marker_at_exit(void) {
    const char *path = getenv("PRELOAD_MARKER");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
}
"#,
    )
    .expect("write marker.c");
    let lib = dir.join(name);
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

#[test]
fn a_library_the_agent_wrote_is_gone_before_main_even_named_like_valgrinds() {
    let home = Home::new();
    home.add("openai", KEY);
    // In /tmp, which anyone can write: the name alone must not earn the exemption.
    let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
    for name in ["evil.so", "vgpreload_core-amd64-linux.so"] {
        let lib = build_marker_lib(dir.path(), name);
        let marker = dir.path().join(format!("{name}.marker"));

        // The marker works: a program that keeps the library writes it.
        let out = Command::new("true")
            .env("LD_PRELOAD", &lib)
            .env("PRELOAD_MARKER", &marker)
            .output()
            .expect("true");
        assert!(out.status.success());
        assert!(
            marker.exists(),
            "the marker library did not run in a plain program"
        );
        std::fs::remove_file(&marker).expect("rm marker");

        let out = run_bounded(
            home.broker()
                .arg("list")
                .env("LD_PRELOAD", &lib)
                .env("PRELOAD_MARKER", &marker)
                .stdin(Stdio::null()),
            Duration::from_secs(30),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("openai"),
            "broker list under LD_PRELOAD={name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !marker.exists(),
            "{name} was still loaded when the broker's main returned: it did not restart without it"
        );
    }
}

#[test]
fn the_broker_runs_under_valgrind_for_the_instruction_counts() {
    if which("valgrind").is_none() {
        broker_integration::skip(
            "valgrind is not installed (apt-get install valgrind; .ci/run does)",
        );
        return;
    }
    let home = Home::new();
    home.add("openai", KEY);
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=none", "--trace-children=no"])
        .arg(broker_integration::broker_bin())
        .arg("list")
        .env("BROKER_HOME", home.path())
        .env("BROKER_KEY_SOURCE", "file")
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("openai"),
        "broker list under valgrind: {stderr}"
    );
    assert!(stderr.contains("Nulgrind"), "not run by valgrind: {stderr}");
    assert!(!stderr.contains("refusing to run"), "{stderr}");
}
