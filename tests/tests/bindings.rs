//! The Python and Node launchers, installed the way a new user would: the Python package built
//! into an sdist, then a wheel, then installed into a fresh virtualenv; the npm package packed
//! and installed into a fresh npm project. Each then runs an agent using the official `openai`
//! SDK of its ecosystem against a local origin playing api.openai.com: the origin gets the real
//! key, the agent sees only the placeholder, and the agent's exit code comes back.
//!
//! To stay cheap on CI, the native parts are not compiled again: the build backends copy the
//! `broker` and `libbroker.so` of `cargo build --workspace` (`BROKER_SHIM_PREBUILT`). The SDKs
//! come from the clients `scripts/test` installs (`python3` on `PATH`, `BROKER_TEST_NODE_MODULES`);
//! nothing asks a registry for our unpublished names. A missing client skips with a reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use broker_integration::{
    contains, run_bounded, scrub, shim_lib, target_dir, Home, Origin, Reply, Serve, TestCa,
};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-bindings-0123456789";
const PLACEHOLDER: &str = "sk-broker-placeholder-openai";
const STEP: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn openai_origin(ca: &TestCa) -> Origin {
    Origin::start(ca, &["api.openai.com"], |req| {
        if req.header("authorization") != Some(format!("Bearer {OPENAI_KEY}").as_str()) {
            return Reply::Text(401, "{\"error\":{\"message\":\"no valid key\"}}".into());
        }
        Reply::Text(
            200,
            "{\"object\":\"list\",\"data\":[{\"id\":\"gpt-test\",\"object\":\"model\",\"created\":0,\"owned_by\":\"test\"}]}"
                .into(),
        )
    })
}

/// `program` with the machine's CA variables scrubbed and `home` as the broker's home.
fn command(program: impl AsRef<std::ffi::OsStr>, home: &Home) -> Command {
    let mut cmd = Command::new(program);
    scrub(&mut cmd);
    cmd.env("BROKER_HOME", home.path())
        .env("BROKER_KEY_SOURCE", "file")
        .env_remove("BROKER_BIN")
        .env_remove("BROKER_SHIM_LIB")
        .env_remove("BROKER_SHIM_ACTIVATED")
        .env_remove("BROKER_SHIM_ACTIVE")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> Output {
    let out = run_bounded(cmd, STEP);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    out
}

/// The agent ran with the placeholder, got the origin's answer, and exited with `code`.
fn assert_agent(out: &Output, code: i32) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(code), "{}", text(out));
    assert!(
        stdout.contains(&format!("key={PLACEHOLDER}")),
        "the agent did not see the placeholder: {}",
        text(out)
    );
    assert!(stdout.contains("models=gpt-test"), "{}", text(out));
    assert!(
        !contains(&out.stdout, OPENAI_KEY) && !contains(&out.stderr, OPENAI_KEY),
        "the real key reached the agent: {}",
        text(out)
    );
}

/// Copy a package directory without build leftovers.
fn copy_package(from: &Path, to: &Path) {
    const SKIP: &[&str] = &[
        "build",
        "dist",
        "rust",
        "_bin",
        "native",
        "node_modules",
        "__pycache__",
    ];
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read package").flatten() {
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if SKIP.contains(&name_str.as_ref())
            || name_str.ends_with(".egg-info")
            || name_str.ends_with(".tgz")
        {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            copy_package(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).expect("copy");
        }
    }
}

fn only_file_with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "want one *{suffix} in {}", dir.display());
    found[0].clone()
}

/// `python3` on PATH with the openai SDK (the clients venv of scripts/test), and the
/// directory to put on PYTHONPATH so a fresh venv can import that SDK.
fn python_with_openai() -> Option<(PathBuf, PathBuf)> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sys, openai, setuptools, venv\n\
             print(sys.executable)\n\
             print(os.path.dirname(os.path.dirname(openai.__file__)))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    Some((lines.next()?.into(), lines.next()?.into()))
}

const PY_AGENT: &str = r#"import os, sys
from openai import OpenAI
client = OpenAI(max_retries=0, timeout=20)
ids = [m.id for m in client.models.list()]
print("key=" + os.environ.get("OPENAI_API_KEY", ""))
print("models=" + ",".join(ids))
sys.stdout.flush()
sys.exit(int(os.environ.get("AGENT_EXIT", "3")))
"#;

const PY_ACTIVATE_AGENT: &str = r#"import os, sys
import broker_shim
print("before-activate")
sys.stdout.flush()
again = broker_shim.activate()
print("activated=%s marker=%s" % (again, os.environ.get("BROKER_SHIM_ACTIVATED")))
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")).read())
"#;

#[test]
fn python_package_from_sdist_runs_the_openai_sdk_under_the_broker() {
    let Some((python, sdk_path)) = python_with_openai() else {
        broker_integration::skip(
            "python3 with openai, setuptools and venv not on PATH (run ./scripts/test)",
        );
        return;
    };
    let _ = shim_lib();
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let resolve = format!("api.openai.com:443:{}", origin.addr);
    let started = Instant::now();

    // sdist from a copy of bindings/python: it must carry the Rust workspace with it.
    let src = t.join("src");
    copy_package(&repo_root().join("bindings/python"), &src);
    ok(command(&python, &home)
        .current_dir(&src)
        .env("BROKER_SHIM_WORKSPACE", repo_root())
        .args([
            "-c",
            "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
        ])
        .arg(t.join("sdist")));
    let sdist = only_file_with_suffix(&t.join("sdist"), ".tar.gz");
    ok(Command::new("tar")
        .arg("xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(t.join("sdist")));
    // setuptools names it broker_shim-<version> (normalized) or broker-shim-<version>.
    let unpacked = std::fs::read_dir(t.join("sdist"))
        .expect("sdist dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("unpacked sdist")
        .join("rust");
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "contract/src/lib.rs",
        "shim/src/lib.rs",
        "broker/src/main.rs",
    ] {
        assert!(unpacked.join(file).is_file(), "the sdist lacks rust/{file}");
    }
    // The sdist's workspace stands on its own (no member missing).
    let meta = ok(Command::new("cargo")
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(&unpacked));
    for package in ["\"broker\"", "\"broker-shim\"", "\"broker-contract\""] {
        assert!(
            contains(&meta.stdout, package),
            "{package} not in the sdist"
        );
    }

    // The wheel, built from the sdist the way pip builds any sdist; the native parts are the
    // workspace's debug build instead of a second cargo build.
    ok(command(&python, &home)
        .env("BROKER_SHIM_PREBUILT", target_dir())
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .args(["-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"])
        .arg("--no-build-isolation")
        .arg("-w")
        .arg(t.join("wheels"))
        .arg(&sdist));
    let wheel = only_file_with_suffix(&t.join("wheels"), ".whl");
    assert!(
        wheel.to_string_lossy().contains("py3-none-linux"),
        "{}",
        wheel.display()
    );

    // A fresh virtualenv, the wheel installed offline.
    let venv = t.join("venv");
    ok(command(&python, &home).args(["-m", "venv"]).arg(&venv));
    ok(command(venv.join("bin/pip"), &home)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .args(["install", "--quiet", "--no-index", "--no-deps"])
        .arg(&wheel));
    let vpython = venv.join("bin/python");
    let agent_dir = t.join("agent");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    std::fs::write(agent_dir.join("agent.py"), PY_AGENT).expect("agent");
    std::fs::write(agent_dir.join("activate_agent.py"), PY_ACTIVATE_AGENT).expect("agent");
    eprintln!(
        "python package built and installed in {:?}",
        started.elapsed()
    );
    let agent = |program: &Path| {
        let mut cmd = command(program, &home);
        cmd.current_dir(&agent_dir).env("PYTHONPATH", &sdk_path);
        cmd
    };

    // The console script: `broker-shim [options] -- python agent.py`.
    let out = run_bounded(
        agent(&venv.join("bin/broker-shim"))
            .env("AGENT_EXIT", "3")
            .arg("--allow")
            .arg("openai")
            .arg("--upstream-ca")
            .arg(&ca.pem_path)
            .arg("--resolve")
            .arg(&resolve)
            .arg("--")
            .arg(&vpython)
            .arg("agent.py"),
        STEP,
    );
    assert_agent(&out, 3);

    // `broker-shim COMMAND` is the bundled broker.
    let out = ok(agent(&venv.join("bin/broker-shim")).arg("list"));
    assert!(contains(&out.stdout, "openai"), "{}", text(&out));

    // broker_shim.run(argv, **opts) returns the agent's code.
    let out = run_bounded(
        agent(&vpython)
            .env("AGENT_EXIT", "4")
            .env("T_CA", &ca.pem_path)
            .env("T_RESOLVE", &resolve)
            .args([
                "-c",
                "import os, sys, broker_shim\n\
                 sys.exit(broker_shim.run([sys.executable, 'agent.py'], allow=['openai'],\n\
                     upstream_ca=os.environ['T_CA'], resolve=os.environ['T_RESOLVE']))",
            ]),
        STEP,
    );
    assert_agent(&out, 4);

    // broker_shim.activate() as the first thing a script does: re-executed once under the
    // broker (the test-only upstream settings reach `broker run` through its env variables).
    let out = run_bounded(
        agent(&vpython)
            .env("AGENT_EXIT", "5")
            .env("BROKER_UPSTREAM_CA", &ca.pem_path)
            .env("BROKER_RESOLVE", &resolve)
            .arg("activate_agent.py"),
        STEP,
    );
    assert_agent(&out, 5);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("before-activate").count(),
        2,
        "the script runs once before and once under the broker: {stdout}"
    );
    assert_eq!(
        stdout.matches("activated=False marker=1").count(),
        1,
        "{stdout}"
    );

    // broker_shim.env() needs a running `broker serve`, and says so.
    let env_script = "import os, subprocess, sys, broker_shim\n\
        e = broker_shim.env(providers=['openai'], base=dict(os.environ, LD_PRELOAD='/opt/other/libx.so'))\n\
        print('preload=' + e['LD_PRELOAD'])\n\
        print('config=' + e['BROKER_SHIM_CONFIG'])\n\
        e = broker_shim.env(providers=['openai'])\n\
        sys.stdout.flush()\n\
        sys.exit(subprocess.run([sys.executable, 'agent.py'], env=e).returncode)";
    let out = run_bounded(agent(&vpython).args(["-c", env_script]), STEP);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        contains(&out.stderr, "BrokerNotRunning") && contains(&out.stderr, "broker serve"),
        "{}",
        text(&out)
    );
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let out = run_bounded(
        agent(&vpython)
            .env("AGENT_EXIT", "6")
            .args(["-c", env_script]),
        STEP,
    );
    assert_agent(&out, 6);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("libbroker.so:/opt/other/libx.so\n"),
        "LD_PRELOAD is prepended, never replaced: {stdout}"
    );
    assert!(
        stdout.contains(&format!("config={}", serve.config_path.display())),
        "{stdout}"
    );
    // Killed without a chance to remove its shim.conf: a stale file is not a running broker.
    drop(serve);
    let out = run_bounded(agent(&vpython).args(["-c", env_script]), STEP);
    assert!(
        contains(&out.stderr, "BrokerNotRunning"),
        "stale shim.conf: {}",
        text(&out)
    );

    let requests = origin.requests();
    assert_eq!(requests.len(), 4, "one request per agent run");
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some(format!("Bearer {OPENAI_KEY}").as_str())));
    eprintln!("python package test done in {:?}", started.elapsed());
}

const NODE_AGENT: &str = r#"const mod = require('openai');
const OpenAI = mod.OpenAI || mod;
(async () => {
  const client = new OpenAI({ maxRetries: 0, timeout: 20000 });
  // The SDK makes the request; the body is read raw because the test origin answers text/plain
  // (the SDK would only parse an application/json body).
  const response = await client.models.list().asResponse();
  const ids = JSON.parse(await response.text()).data.map((m) => m.id);
  console.log('key=' + process.env.OPENAI_API_KEY);
  console.log('models=' + ids.join(','));
  process.exit(Number(process.env.AGENT_EXIT || 3));
})().catch((err) => {
  console.error('agent failed: ' + err);
  process.exit(99);
});
"#;

const NODE_SPAWN: &str = r#"const shim = require('broker-shim');
const child = shim.spawn('node', ['agent.js'], {
  allow: ['openai'],
  upstreamCa: process.env.T_CA,
  resolve: process.env.T_RESOLVE,
});
child.on('exit', (code) => process.exit(code));
"#;

const NODE_ENV: &str = r#"const shim = require('broker-shim');
const { spawnSync } = require('child_process');
shim.env({ providers: ['openai'], base: { ...process.env, LD_PRELOAD: '/opt/other/libx.so' } })
  .then(async (e) => {
    console.log('preload=' + e.LD_PRELOAD);
    const env = await shim.env({ providers: ['openai'] });
    process.exit(spawnSync('node', ['agent.js'], { env, stdio: 'inherit' }).status);
  })
  .catch((err) => {
    console.error(err.name + ': ' + err.message);
    process.exit(1);
  });
"#;

#[test]
fn node_package_from_npm_pack_runs_the_openai_sdk_under_the_broker() {
    let Some(node_modules) = std::env::var_os("BROKER_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .filter(|p| p.join("openai").is_dir())
    else {
        broker_integration::skip(
            "BROKER_TEST_NODE_MODULES with the openai SDK is not set (run ./scripts/test)",
        );
        return;
    };
    let _ = shim_lib();
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let resolve = format!("api.openai.com:443:{}", origin.addr);
    let started = Instant::now();
    let npm = |dir: &Path| {
        let mut cmd = command("npm", &home);
        cmd.current_dir(dir)
            .env("npm_config_cache", t.join("npm-cache"))
            .env("npm_config_offline", "true")
            .env("npm_config_update_notifier", "false")
            .env("npm_config_audit", "false")
            .env("npm_config_fund", "false");
        cmd
    };

    // Without its native parts the package fails and says how to get them.
    let pkg = t.join("pkg");
    copy_package(&repo_root().join("bindings/node"), &pkg);
    let out = run_bounded(
        command("node", &home)
            .arg(pkg.join("bin/broker-shim.js"))
            .args(["--", "true"]),
        STEP,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        contains(&out.stderr, "native broker is missing")
            && contains(&out.stderr, "npm run build-native"),
        "{}",
        text(&out)
    );

    // build-native (copying the workspace build), pack, install into a fresh project offline.
    ok(npm(&pkg).env("BROKER_SHIM_PREBUILT", target_dir()).args([
        "run",
        "--silent",
        "build-native",
    ]));
    ok(npm(&pkg)
        .args(["pack", "--silent", "--pack-destination"])
        .arg(t));
    let tarball = only_file_with_suffix(t, ".tgz");
    let project = t.join("project");
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(
        project.join("package.json"),
        "{\"name\":\"agent\",\"private\":true}\n",
    )
    .expect("package.json");
    ok(npm(&project).args(["install", "--silent"]).arg(&tarball));
    assert!(project
        .join("node_modules/broker-shim/native/broker")
        .is_file());
    std::fs::write(project.join("agent.js"), NODE_AGENT).expect("agent");
    std::fs::write(project.join("spawn.js"), NODE_SPAWN).expect("spawn");
    std::fs::write(project.join("env.js"), NODE_ENV).expect("env");
    eprintln!(
        "npm package packed and installed in {:?}",
        started.elapsed()
    );
    let agent = |program: &str| {
        let mut cmd = command(program, &home);
        cmd.current_dir(&project)
            .env("NODE_PATH", &node_modules)
            .env("npm_config_cache", t.join("npm-cache"))
            .env("npm_config_offline", "true")
            .env("npm_config_update_notifier", "false");
        cmd
    };

    // npx broker-shim [options] -- node agent.js
    let out = run_bounded(
        agent("npx")
            .env("AGENT_EXIT", "3")
            .args(["broker-shim", "--allow", "openai", "--upstream-ca"])
            .arg(&ca.pem_path)
            .args(["--resolve", &resolve, "--", "node", "agent.js"]),
        STEP,
    );
    assert_agent(&out, 3);

    // spawn(cmd, args, opts): the exit code comes back through the ChildProcess.
    let out = run_bounded(
        agent("node")
            .env("AGENT_EXIT", "4")
            .env("T_CA", &ca.pem_path)
            .env("T_RESOLVE", &resolve)
            .arg("spawn.js"),
        STEP,
    );
    assert_agent(&out, 4);

    // env() needs a running `broker serve`, and says so.
    let out = run_bounded(agent("node").arg("env.js"), STEP);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        contains(&out.stderr, "BrokerShimError") && contains(&out.stderr, "broker serve"),
        "{}",
        text(&out)
    );
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let out = run_bounded(agent("node").env("AGENT_EXIT", "6").arg("env.js"), STEP);
    assert_agent(&out, 6);
    assert!(
        contains(&out.stdout, "libbroker.so:/opt/other/libx.so\n"),
        "LD_PRELOAD is prepended, never replaced: {}",
        text(&out)
    );
    drop(serve);
    let out = run_bounded(agent("node").arg("env.js"), STEP);
    assert!(
        contains(&out.stderr, "BrokerShimError"),
        "stale shim.conf: {}",
        text(&out)
    );

    // SIGTERM to the launcher reaches the agent; the launcher exits as the agent did.
    let marker = t.join("started");
    let mut child = agent(
        &project
            .join("node_modules/.bin/broker-shim")
            .to_string_lossy(),
    )
    .args(["--", "sh", "-c"])
    .arg(format!("touch {}; exec sleep 30", marker.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM was not relayed to the agent");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(143),
        "128+SIGTERM, as broker run reports it"
    );

    let requests = origin.requests();
    assert_eq!(requests.len(), 3, "one request per agent run");
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some(format!("Bearer {OPENAI_KEY}").as_str())));
    eprintln!("node package test done in {:?}", started.elapsed());
}

/// `scripts/package --prebuilt target/<profile> --out target/<profile>/package-test`, once per
/// test process: the wheel and npm tarballs a release would ship, around the workspace's build.
fn packaged() -> PathBuf {
    static DIST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIST.get_or_init(|| {
        let _ = shim_lib();
        let dist = target_dir().join("package-test");
        let _ = std::fs::remove_dir_all(&dist);
        let started = Instant::now();
        let out = run_bounded(
            Command::new(repo_root().join("scripts/package"))
                .arg("--prebuilt")
                .arg(target_dir())
                .arg("--out")
                .arg(&dist)
                .stdin(Stdio::null()),
            Duration::from_secs(600),
        );
        assert!(
            out.status.success(),
            "scripts/package failed: {}",
            text(&out)
        );
        eprintln!(
            "scripts/package in {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        dist
    })
    .clone()
}

/// `PATH` without any directory that holds cargo or rustc: the installs must not need Rust.
fn path_without_rust() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|d| !d.join("cargo").exists() && !d.join("rustc").exists())
        .collect();
    std::env::join_paths(dirs).expect("PATH")
}

#[test]
fn packaged_wheel_installs_without_rust_and_runs_the_openai_sdk() {
    let Some((python, sdk_path)) = python_with_openai() else {
        broker_integration::skip(
            "python3 with openai, setuptools and venv not on PATH (run ./scripts/test)",
        );
        return;
    };
    let dist = packaged();
    let wheel = only_file_with_suffix(&dist.join("python"), ".whl");
    let name = wheel
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("broker_shim-") && name.contains("-py3-none-manylinux_"),
        "{name}"
    );
    only_file_with_suffix(&dist.join("python"), ".tar.gz");

    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let resolve = format!("api.openai.com:443:{}", origin.addr);
    let no_rust = path_without_rust();

    // A fresh venv, the wheel installed offline, then the first brokered call.
    let started = Instant::now();
    let venv = t.join("venv");
    ok(command(&python, &home).args(["-m", "venv"]).arg(&venv));
    ok(command(venv.join("bin/pip"), &home)
        .env("PATH", &no_rust)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .args(["install", "--quiet", "--no-index", "--no-deps"])
        .arg(&wheel));
    let installed = started.elapsed();
    std::fs::write(t.join("agent.py"), PY_AGENT).expect("agent");
    let out = run_bounded(
        command(venv.join("bin/broker-shim"), &home)
            .current_dir(t)
            .env("PATH", &no_rust)
            .env("PYTHONPATH", &sdk_path)
            .env("AGENT_EXIT", "3")
            .args(["--allow", "openai", "--upstream-ca"])
            .arg(&ca.pem_path)
            .args(["--resolve", &resolve, "--"])
            .arg(venv.join("bin/python"))
            .arg("agent.py"),
        STEP,
    );
    assert_agent(&out, 3);
    eprintln!(
        "wheel: installed in {installed:?}, first brokered call done {:?} after pip install started",
        started.elapsed()
    );
    // The package's own binaries ran (no broker on PATH here to fall back to).
    let bin = venv.join(format!(
        "lib/python3.{}/site-packages/broker_shim/_bin",
        python_minor(&venv)
    ));
    assert!(
        bin.join("broker").is_file() && bin.join("libbroker.so").is_file(),
        "{}",
        bin.display()
    );
    assert_eq!(origin.requests().len(), 1);
}

fn python_minor(venv: &Path) -> String {
    let out = ok(Command::new(venv.join("bin/python"))
        .args(["-c", "import sys; print(sys.version_info[1])"]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const NODE_FETCH_AGENT: &str = r#"fetch('https://api.openai.com/v1/models', {
  headers: { Authorization: 'Bearer ' + process.env.OPENAI_API_KEY },
})
  .then(async (r) => {
    const ids = JSON.parse(await r.text()).data.map((m) => m.id);
    console.log('key=' + process.env.OPENAI_API_KEY);
    console.log('models=' + ids.join(','));
    process.exit(Number(process.env.AGENT_EXIT || 3));
  })
  .catch((err) => {
    console.error('agent failed: ' + err);
    process.exit(1);
  });
"#;

#[test]
fn packaged_npm_tarballs_install_offline_and_run_a_fetch_agent() {
    if broker_integration::which("npm").is_none() {
        broker_integration::skip("npm is not installed");
        return;
    }
    let dist = packaged().join("npm");
    let main = dist.join("broker-shim-0.1.0.tgz");
    let platform = only_file_with_suffix(&dist, "-gnu-0.1.0.tgz");
    assert!(main.is_file(), "{}", main.display());

    let tmp = tempfile::tempdir().expect("tempdir");
    let project = tmp.path().join("project");
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(
        project.join("package.json"),
        "{\"name\":\"agent\",\"private\":true}\n",
    )
    .expect("package.json");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let resolve = format!("api.openai.com:443:{}", origin.addr);
    let npm_env = |cmd: &mut Command| {
        cmd.current_dir(&project)
            .env("PATH", path_without_rust())
            .env("npm_config_cache", tmp.path().join("npm-cache"))
            .env("npm_config_offline", "true")
            .env("npm_config_update_notifier", "false")
            .env("npm_config_audit", "false")
            .env("npm_config_fund", "false");
    };

    // Both tarballs, offline, into a fresh project: no build step, no registry.
    let mut install = command("npm", &home);
    npm_env(&mut install);
    ok(install
        .args(["install", "--silent"])
        .arg(&main)
        .arg(&platform));
    // npm's names for the CPU (`process.arch`), as in the platform package's name.
    let cpu = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    let carried = project.join(format!("node_modules/@broker-shim/linux-{cpu}-gnu"));
    assert!(carried.join("broker").is_file() && carried.join("libbroker.so").is_file());
    assert!(!project.join("node_modules/broker-shim/native").exists());

    std::fs::write(project.join("agent.js"), NODE_FETCH_AGENT).expect("agent");
    let mut run = command("npx", &home);
    npm_env(&mut run);
    let out = run_bounded(
        run.env("AGENT_EXIT", "5")
            .args(["broker-shim", "--allow", "openai", "--upstream-ca"])
            .arg(&ca.pem_path)
            .args(["--resolve", &resolve, "--", "node", "agent.js"]),
        STEP,
    );
    assert_agent(&out, 5);
    assert_eq!(origin.requests().len(), 1);
}
