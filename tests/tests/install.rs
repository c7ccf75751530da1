//! A broker installed on its own (`cargo install --path broker`: the binary, no
//! `libbroker.so` beside it) starts agents with the shim it carries inside: written to the
//! user's cache directory, and checked against the embedded copy before every run. The agent's
//! user can write there (it is the same user), so a shim it planted for the next run is
//! replaced, never loaded.
//!
//! `cargo install` itself rebuilds the whole broker (tests/tests/crates.rs does that once,
//! from the packaged crates), so these tests copy the workspace's `broker` binary, which
//! carries the shim the same way (the `embedded-shim` feature is on by default), into a
//! directory of its own. Everything runs as an ordinary uid (`setpriv`), the attacker included.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use broker_integration::{
    as_agent_user, broker_bin, contains, give_to_agent_user, run_bounded, scrub, Home, Origin,
    TestCa,
};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-install-0123456789";

struct Installed {
    /// Holds `bin/broker` (alone), the cache directory and the agent user's `$HOME`.
    root: tempfile::TempDir,
    home: Home,
    _ca: TestCa,
    origin: Origin,
}

impl Installed {
    fn new() -> Installed {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        std::fs::copy(broker_bin(), bin.join("broker")).expect("copy broker");
        std::fs::create_dir(root.path().join("user")).expect("home");
        let ca = TestCa::new();
        std::fs::copy(&ca.pem_path, root.path().join("ca.pem")).expect("ca");
        let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
        let home = Home::new();
        home.add("openai", OPENAI_KEY);
        give_to_agent_user(root.path());
        give_to_agent_user(home.path());
        Installed {
            root,
            home,
            _ca: ca,
            origin,
        }
    }

    fn cache(&self) -> PathBuf {
        self.root.path().join("user/.cache/broker")
    }

    /// The installed `broker ARGS` as the agent's user, with its home, cache and HOME.
    fn broker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.root.path().join("bin/broker"));
        scrub(&mut cmd);
        cmd.env("BROKER_HOME", self.home.path())
            .env("BROKER_KEY_SOURCE", "file")
            .env("HOME", self.root.path().join("user"))
            .env_remove("XDG_CACHE_HOME")
            .env_remove("BROKER_SHIM_LIB")
            .current_dir(self.root.path())
            .args(args);
        let mut cmd = as_agent_user(&cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `broker run` of a curl agent calling api.openai.com with its placeholder.
    fn run_agent(&self, extra: &[&str]) -> Output {
        let resolve = format!("api.openai.com:443:{}", self.origin.addr);
        let ca = self.root.path().join("ca.pem");
        let mut args = vec![
            "run",
            "--upstream-ca",
            ca.to_str().expect("utf-8"),
            "--resolve",
            &resolve,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--",
            "sh",
            "-c",
            "curl -sS --fail-with-body https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"",
        ]);
        run_bounded(&mut self.broker(&args), Duration::from_secs(60))
    }

    /// As the agent's user, `sh -c script` (the attacker planting a file).
    fn as_user_sh(&self, script: &str) {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let out = run_bounded(&mut as_agent_user(&cmd), Duration::from_secs(30));
        assert!(out.status.success(), "{script}: {}", text(&out));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_brokered(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
    assert!(contains(&out.stdout, "data"), "{}", text(out));
    assert!(!contains(&out.stdout, OPENAI_KEY) && !contains(&out.stderr, OPENAI_KEY));
    // The loader says so when a preloaded library is not a loadable one.
    assert!(!contains(&out.stderr, "ld.so"), "{}", text(out));
}

/// The single `shim-*/libbroker.so` under the cache.
fn cached_shim(cache: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].join("libbroker.so")
}

#[test]
fn a_lone_broker_binary_runs_agents_with_the_shim_it_carries() {
    let t = Installed::new();
    assert!(!t.root.path().join("bin/libbroker.so").exists());
    assert!(!t.cache().exists());

    let out = t.run_agent(&[]);
    assert_brokered(&out);
    assert_eq!(t.origin.requests().len(), 1);

    // Written once, private, named by its hash; `broker shim` and `broker doctor` name it.
    let shim = cached_shim(&t.cache());
    let meta = std::fs::symlink_metadata(&shim).expect("shim");
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o500);
    for dir in [t.cache(), shim.parent().expect("dir").to_path_buf()] {
        assert_eq!(std::fs::metadata(&dir).expect("dir").mode() & 0o7777, 0o700);
    }
    let printed = run_bounded(&mut t.broker(&["shim"]), Duration::from_secs(30));
    assert!(printed.status.success(), "{}", text(&printed));
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        shim.display().to_string()
    );
    let doctor = run_bounded(
        &mut t.broker(&["doctor", "--no-self-test"]),
        Duration::from_secs(120),
    );
    let doctor_text = text(&doctor);
    assert!(
        doctor_text.contains(&shim.display().to_string())
            && doctor_text.contains("carried inside the broker binary"),
        "{doctor_text}"
    );

    // `broker shim --install FILE`: the library for a bare LD_PRELOAD (a system broker's users).
    // It writes the bytes the binary carries, not a file an agent planted beside the binary
    // (this is the command run with sudo for every user of a system broker).
    let planted = t.root.path().join("bin/libbroker.so");
    std::fs::write(&planted, b"\x7fELF planted by the agent").expect("plant");
    let installed = t.root.path().join("user/libbroker.so");
    let out = run_bounded(
        &mut t.broker(&["shim", "--install", installed.to_str().expect("utf-8")]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(&installed).expect("installed"),
        std::fs::read(&shim).expect("shim")
    );
    assert_eq!(
        std::fs::metadata(&installed).expect("installed").mode() & 0o777,
        0o755
    );
    std::fs::remove_file(&planted).expect("unplant");
}

#[test]
fn a_shim_planted_in_the_cache_is_replaced_not_loaded() {
    let t = Installed::new();
    assert_brokered(&t.run_agent(&[]));
    let shim = cached_shim(&t.cache());
    let genuine = std::fs::read(&shim).expect("shim");
    let planted = t.root.path().join("user/planted.so");
    std::fs::write(&planted, b"not the broker's library: the attacker's").expect("planted");
    give_to_agent_user(&planted);
    let (s, p) = (shim.display(), planted.display());

    // The agent's user rewrites the cached file (the mode put back), swaps in a symlink to its
    // own library, or a directory; loosens the directory's mode. Each next run (sandboxed and
    // not) uses the genuine bytes again, and the request is brokered.
    let plants = [
        format!("chmod 700 {s} && cat {p} > {s} && chmod 500 {s}"),
        format!("rm -f {s} && ln -s {p} {s}"),
        format!("rm -f {s} && mkdir {s} && chmod 777 $(dirname {s})"),
    ];
    for (i, plant) in plants.iter().enumerate() {
        t.as_user_sh(plant);
        assert_ne!(
            std::fs::read(&shim).ok().as_ref(),
            Some(&genuine),
            "{plant}"
        );
        let extra: &[&str] = if i % 2 == 0 { &[] } else { &["--no-sandbox"] };
        assert_brokered(&t.run_agent(extra));
        let meta = std::fs::symlink_metadata(&shim).expect("shim");
        assert!(meta.is_file(), "{plant}: not a regular file again");
        assert_eq!(std::fs::read(&shim).expect("shim"), genuine, "{plant}");
        assert_eq!(
            std::fs::metadata(shim.parent().expect("dir"))
                .expect("dir")
                .mode()
                & 0o7777,
            0o700
        );
    }
    assert_eq!(
        std::fs::read(&planted).expect("planted"),
        b"not the broker's library: the attacker's",
        "the symlink's target is left alone"
    );
    assert_eq!(t.origin.requests().len(), 1 + plants.len());
}

#[test]
fn another_users_cache_directory_is_refused_with_what_to_do() {
    if !broker_integration::is_root() {
        broker_integration::skip("needs root to make a directory of another uid");
        return;
    }
    let t = Installed::new();
    // Root's (the test's) directory where the agent user's cache should be.
    std::fs::create_dir_all(t.cache()).expect("cache");
    std::os::unix::fs::chown(t.cache(), Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(t.cache(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = t.run_agent(&[]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("is not a directory of uid") && said.contains("XDG_CACHE_HOME"),
        "{said}"
    );
    assert!(t.origin.requests().is_empty());
}
