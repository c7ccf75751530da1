//! The system broker (`broker serve --system`) under a user of its own: real users made with
//! `useradd` (the broker's, an allowed agent's, an admin's, and one not on the list), the real
//! binary started with `setpriv` as the broker's user, a bare `LD_PRELOAD=libbroker.so` for
//! curl, Python and Node as the agent, and everything an agent running as an allowed uid might
//! try against the broker, refused.
//!
//! Root only (CI runs as root; `useradd` and `setpriv` need it): elsewhere each test prints a
//! SKIP line and passes. The paths hang off a root-made directory (`--system-root`), since the
//! real /etc, /var/lib and /run belong to the machine.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use broker_integration::oauth::{api_origin, drive_login, tokens_seen, OAuthServer, API_HOST};
use broker_integration::{
    broker_bin_for_agent_user, count_events, is_root, preset_ca_vars, run_bounded, scrub, Origin,
    TestCa,
};

const OPENAI_KEY: &str = "sk-test-system-broker-key-0123456789abcdef";
/// A key a shim hands over from an agent's environment (a `.env`): only that run may use it.
const GROQ_KEY: &str = "gsk_test_system_broker_handover_0123456789abcdef";

/// A user made for the test, removed (with its group) when dropped.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create(name: &str) -> TestUser {
        // A user left behind by an earlier run that was killed: start clean.
        let _ = Command::new("userdel").arg(name).output();
        let _ = Command::new("groupdel").arg(name).output();
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
            ])
            .args(["--shell", "/usr/sbin/nologin", name])
            .output()
            .expect("useradd");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestUser::existing(name)
    }

    fn existing(name: &str) -> TestUser {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, name]).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        TestUser {
            name: name.to_string(),
            uid: id("-u"),
            gid: id("-g"),
        }
    }

    /// `program args...` as this user (its own group only), with a clean environment.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        scrub(&mut cmd);
        cmd.env_remove("XDG_RUNTIME_DIR")
            .env("HOME", "/nonexistent")
            .env_remove("BROKER_HOME")
            .current_dir("/");
        cmd
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Where its shims merged CA bundles (see `shim/src/env.rs`, `bundle_dir`).
        let _ = std::fs::remove_dir_all(format!("/tmp/broker-shim-{}", self.uid));
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A root-made directory standing in for `/` (every directory above it is root's and
/// writable by no one else, as /run and /etc are).
struct SystemRoot(PathBuf);

impl SystemRoot {
    fn new(tag: &str) -> SystemRoot {
        let base = Path::new("/var/lib/broker-tests");
        std::fs::create_dir_all(base).expect("base");
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let dir = base.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("root dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["run", "var/lib", "etc"] {
            std::fs::create_dir_all(dir.join(sub)).expect("sub");
        }
        SystemRoot(dir)
    }
    fn run_dir(&self) -> PathBuf {
        self.0.join("run/broker")
    }
    fn state_dir(&self) -> PathBuf {
        self.0.join("var/lib/broker")
    }
    fn etc_dir(&self) -> PathBuf {
        self.0.join("etc/broker")
    }
    /// The test-only upstream flags of a system broker: the test CA (copied where the
    /// broker's user can read it) and `--resolve` for each (host, origin).
    fn upstream_args(&self, ca: &TestCa, hosts: &[(&str, SocketAddr)]) -> Vec<String> {
        let upstream_ca = self.0.join("upstream-ca.pem");
        std::fs::copy(&ca.pem_path, &upstream_ca).expect("copy ca");
        std::fs::set_permissions(&upstream_ca, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let mut args = vec![
            "--upstream-ca".to_string(),
            upstream_ca.display().to_string(),
        ];
        for (host, addr) in hosts {
            args.push("--resolve".into());
            args.push(format!("{host}:443:{addr}"));
        }
        args
    }
    fn audit(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("audit.jsonl")).unwrap_or_default()
    }
    /// Wait until the audit log holds `event` (the audit writer batches).
    fn audit_until(&self, event: &str, at_least: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let audit = self.audit();
            if count_events(&audit, event) >= at_least || Instant::now() > deadline {
                return audit;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SystemRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running system broker, killed on drop.
struct SystemBroker {
    child: Child,
    stderr: PathBuf,
}

impl SystemBroker {
    fn start(root: &SystemRoot, user: &TestUser, extra: &[String]) -> SystemBroker {
        SystemBroker::start_limited(root, user, extra, None)
    }

    /// Started at a descriptor limit of `nofile` (hard and soft), which sets its caps.
    fn start_limited(
        root: &SystemRoot,
        user: &TestUser,
        extra: &[String],
        nofile: Option<u32>,
    ) -> SystemBroker {
        let stderr = root.0.join("broker.stderr");
        let mut cmd = match nofile {
            None => user.command(broker_bin_for_agent_user()),
            Some(n) => {
                let mut cmd = user.command("/bin/bash");
                cmd.args(["-c", &format!("ulimit -n {n} && exec \"$@\""), "bash"])
                    .arg(broker_bin_for_agent_user());
                cmd
            }
        };
        cmd.args(["serve", "--system", "--system-root"])
            .arg(&root.0)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr"));
        let mut broker = SystemBroker {
            child: cmd.spawn().expect("spawn broker serve --system"),
            stderr,
        };
        let config = root.run_dir().join("shim.conf");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !config.exists() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!(
                    "broker serve --system exited ({status}): {}",
                    broker.stderr()
                );
            }
            assert!(Instant::now() < deadline, "not ready: {}", broker.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The pid of the broker itself (setpriv, and bash for a limit, exec it, so the child's
    /// pid is the broker's).
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SystemBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    broker_integration::skip(&format!(
        "{test}: needs root (useradd, setpriv); CI runs as root"
    ));
    true
}

/// A short tag unique to this test process, for user names (at most 32 characters).
fn tag(role: &str) -> String {
    format!("bt{role}{}", std::process::id() % 100_000)
}

fn shim() -> PathBuf {
    broker_bin_for_agent_user().with_file_name("libbroker.so")
}

/// `sh -c script` as `user` with a bare preload pointed at the test's system broker. The
/// preload starts after `setpriv` (with `env`), so the first process that loads the shim is
/// the agent's own, as when the user starts it from a shell.
fn bare_preload(user: &TestUser, root: &SystemRoot, script: &str, preset: bool) -> Command {
    let mut cmd = user.command("/usr/bin/env");
    if preset {
        preset_ca_vars(&mut cmd);
    }
    cmd.env(broker_contract::ENV_SYSTEM_RUN, root.run_dir())
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .arg(format!("LD_PRELOAD={}", shim().display()))
        .args(["/bin/sh", "-c", script]);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_root_file(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

const CURL: &str = "curl -sS --fail-with-body https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"";
const PYTHON: &str = "/usr/bin/python3 -c 'import os, urllib.request; r = urllib.request.Request(\"https://api.openai.com/v1/models\", headers={\"Authorization\": \"Bearer \" + os.environ[\"OPENAI_API_KEY\"]}); print(urllib.request.urlopen(r).read().decode(), end=\"\")'";
const NODE: &str = "node -e 'fetch(\"https://api.openai.com/v1/models\", {headers: {authorization: \"Bearer \" + process.env.OPENAI_API_KEY}}).then(async r => { process.stdout.write(await r.text()); process.exit(r.ok ? 0 : 1) }).catch(e => { console.error(e); process.exit(2) })'";

#[test]
fn a_system_broker_serves_its_allowed_uids_and_nothing_of_it_is_theirs() {
    if skip_unless_root("a_system_broker_serves_its_allowed_uids_and_nothing_of_it_is_theirs") {
        return;
    }
    let ca = TestCa::new();
    let openai = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "ok");
    let groq = Origin::bearer(&ca, "api.groq.com", GROQ_KEY, "groq-ok");
    let root = SystemRoot::new("sys");
    let (broker_name, agent_name, admin_name, other_name) =
        (tag("b"), tag("a"), tag("m"), tag("o"));
    let agent = TestUser::create(&agent_name);
    let admin = TestUser::create(&admin_name);
    let other = TestUser::create(&other_name);

    // Install as root: the broker's user (useradd), /etc/broker, the key, the directories.
    let _ = Command::new("userdel").arg(&broker_name).output();
    let _ = Command::new("groupdel").arg(&broker_name).output();
    let out = run_bounded(
        Command::new(broker_integration::broker_bin())
            .args([
                "system",
                "install",
                "--no-unit",
                "--user",
                &broker_name,
                "--allow-user",
                &agent_name,
                "--root",
            ])
            .arg(&root.0),
        Duration::from_secs(30),
    );
    let broker_user = TestUser::existing(&broker_name);
    assert!(out.status.success(), "install: {}", text(&out));
    let key_mode = std::fs::metadata(root.etc_dir().join("master.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(
        key_mode & 0o777,
        0o640,
        "the master key is root's, readable by the broker's group only"
    );
    // The admin's policy: the agent may use openai and groq, under the default profile.
    write_root_file(
        &root.etc_dir().join("config.toml"),
        &format!(
            "[access]\nusers = [\"{agent_name}\"]\nadmin_users = [\"{admin_name}\"]\n\
             [[policy]]\nusers = [\"{agent_name}\"]\nproviders = [\"openai\", \"groq\"]\n"
        ),
        0o644,
    );
    let broker = SystemBroker::start(
        &root,
        &broker_user,
        &root.upstream_args(
            &ca,
            &[("api.openai.com", openai.addr), ("api.groq.com", groq.addr)],
        ),
    );

    // The admin adds the key over the control socket, from stdin.
    let admin_cli = |args: &[&str], stdin: &str| -> Output {
        let mut cmd = admin.command(broker_bin_for_agent_user());
        cmd.args(args)
            .env(broker_contract::ENV_SYSTEM_RUN, root.run_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write");
        child.wait_with_output().expect("wait")
    };
    let out = admin_cli(&["add", "openai", "--system"], OPENAI_KEY);
    assert!(out.status.success(), "admin add: {}", text(&out));
    let out = admin_cli(&["list", "--system", "--json"], "");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"openai\""),
        "admin list: {}",
        text(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(OPENAI_KEY));

    // `broker doctor` says which broker a bare preload would use, and what each uid may do.
    let doctor = |user: &TestUser| -> String {
        let mut cmd = user.command(broker_bin_for_agent_user());
        cmd.args(["doctor", "--no-self-test", "--json"])
            .env(broker_contract::ENV_SYSTEM_RUN, root.run_dir());
        String::from_utf8_lossy(&run_bounded(&mut cmd, Duration::from_secs(60)).stdout).into_owned()
    };
    let shown = doctor(&agent);
    assert!(shown.contains("uses the system broker"), "{shown}");
    assert!(
        shown.contains(&format!("uid {} may use its credentials", agent.uid)),
        "{shown}"
    );
    assert!(doctor(&admin).contains("use and administer it"));
    let shown = doctor(&other);
    assert!(
        shown.contains(&format!("uid {} is not on its access list", other.uid)),
        "{shown}"
    );
    assert!(shown.contains("finds no broker it may use"), "{shown}");

    // The agent's bare preload: curl, Python and Node, CA variables scrubbed and preset.
    let mut served = 0;
    for (client, script) in [("curl", CURL), ("python", PYTHON), ("node", NODE)] {
        for preset in [false, true] {
            let out = run_bounded(
                &mut bare_preload(&agent, &root, script, preset),
                Duration::from_secs(60),
            );
            assert!(
                out.status.success(),
                "{client} preset={preset}: {}\nbroker: {}",
                text(&out),
                broker.stderr()
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "ok",
                "{client} preset={preset}"
            );
            served += 1;
        }
    }
    let requests = openai.requests();
    assert_eq!(requests.len(), served);
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some(&format!("Bearer {OPENAI_KEY}"))));
    let audit = root.audit_until("credential_use", served);
    assert_eq!(count_events(&audit, "credential_use"), served, "{audit}");
    assert!(
        audit.contains(&format!("\"uid\":{}", agent.uid)),
        "the audit names the agent's uid: {audit}"
    );

    // A provider its policy does not give it: refused by the broker, before any upstream.
    let out = run_bounded(
        &mut bare_preload(
            &agent,
            &root,
            "curl -sS -i https://api.github.com/user -H \"Authorization: Bearer $GITHUB_TOKEN\"",
            false,
        ),
        Duration::from_secs(30),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("403") && shown.contains(&format!("not allowed for uid {}", agent.uid)),
        "{}",
        text(&out)
    );

    // A key from the agent's own environment (a .env) is handed to the broker for that process
    // tree: the origin gets it, the agent keeps only the placeholder.
    let out = run_bounded(
        bare_preload(
            &agent,
            &root,
            "echo key=$GROQ_API_KEY; curl -sS --fail-with-body https://api.groq.com/openai/v1/models -H \"Authorization: Bearer $GROQ_API_KEY\"",
            false,
        )
        .env("GROQ_API_KEY", GROQ_KEY),
        Duration::from_secs(30),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && shown.ends_with("groq-ok"),
        "handover: {}\nbroker: {}",
        text(&out),
        broker.stderr()
    );
    assert!(
        !shown.contains(GROQ_KEY),
        "the agent sees the placeholder: {shown}"
    );
    assert!(
        !std::fs::read_dir(root.state_dir())
            .expect("state")
            .any(|e| {
                std::fs::read(e.expect("entry").path())
                    .is_ok_and(|b| broker_integration::contains(&b, GROQ_KEY))
            }),
        "a handed key is never stored"
    );

    // The agent, as an attacker with a shell: everything of the broker's is out of reach.
    let pid = broker.pid();
    let attacks: Vec<(&str, String)> = vec![
        ("read the state directory", format!("ls {}", root.state_dir().display())),
        ("read the vault", format!("cat {}/vault.db", root.state_dir().display())),
        ("read the audit log", format!("cat {}/audit.jsonl", root.state_dir().display())),
        ("read the master key", format!("cat {}/master.key", root.etc_dir().display())),
        ("read the broker's environment", format!("cat /proc/{pid}/environ")),
        ("read the broker's memory", format!("/usr/bin/python3 -c 'open(\"/proc/{pid}/mem\", \"rb\")'")),
        ("ptrace the broker", format!("/usr/bin/python3 -c 'import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); sys.exit(0 if libc.ptrace(16, {pid}, 0, 0) == 0 else 1)'")),
        ("write the runtime directory", format!("touch {}/planted", root.run_dir().display())),
        ("replace the shim config", format!("cp /etc/hostname {}/shim.conf", root.run_dir().display())),
        ("stand up a fake control socket", format!("rm -f {d}/control.sock; /usr/bin/python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"{d}/control.sock\")'", d = root.run_dir().display())),
        ("plant a provider file", format!("echo 'name = \"evil\"' > {}/providers/evil.toml", root.etc_dir().display())),
        ("plant a provider file in the state directory", format!("mkdir -p {d}/providers && echo x > {d}/providers/evil.toml", d = root.state_dir().display())),
        ("edit the config", format!("echo '[access]' >> {}/config.toml", root.etc_dir().display())),
        ("show the key from the system's vault", format!("BROKER_HOME={} {} show openai --json", root.state_dir().display(), broker_bin_for_agent_user().display())),
        ("show the key through the system broker", format!("{} show openai --json --system", broker_bin_for_agent_user().display())),
        ("list the system broker's keys", format!("{} list --system", broker_bin_for_agent_user().display())),
        ("replace the system broker's key", format!("echo sk-attacker-0123456789abcdef01234567 | {} add openai --system --force", broker_bin_for_agent_user().display())),
    ];
    for (what, script) in &attacks {
        let mut cmd = agent.command("/bin/sh");
        cmd.args(["-c", script])
            .env(broker_contract::ENV_SYSTEM_RUN, root.run_dir());
        let out = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(
            !out.status.success(),
            "the agent could {what}: {}",
            text(&out)
        );
        assert!(
            !broker_integration::contains(&out.stdout, OPENAI_KEY)
                && !broker_integration::contains(&out.stderr, OPENAI_KEY),
            "{what}"
        );
    }
    assert!(
        broker.pid() > 0 && Path::new(&format!("/proc/{pid}")).exists(),
        "the broker still runs"
    );
    let audit = root.audit_until("admin_refused", 1);
    assert_eq!(
        count_events(&audit, "admin_refused"),
        1,
        "the key replacement attempt is audited: {audit}"
    );
    // The key is still the admin's: the agent's uid still gets through with it.
    let out = run_bounded(
        &mut bare_preload(&agent, &root, CURL, false),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "after the attacks: {}", text(&out));

    // A lookalike config planted by the agent is not trusted by another user's shim.
    let fake = PathBuf::from(format!("/tmp/{}-fake-run", tag("f")));
    let _ = std::fs::remove_dir_all(&fake);
    let mut cmd = agent.command("/bin/sh");
    cmd.args([
        "-c",
        &format!(
            "mkdir -p {f} && cp {r}/shim.conf {f}/shim.conf && chmod 755 {f}",
            f = fake.display(),
            r = root.run_dir().display()
        ),
    ]);
    assert!(run_bounded(&mut cmd, Duration::from_secs(10))
        .status
        .success());
    let mut cmd = bare_preload(&admin, &root, "echo $BROKER_SHIM_ACTIVE", false);
    cmd.env(broker_contract::ENV_SYSTEM_RUN, &fake);
    let out = run_bounded(&mut cmd, Duration::from_secs(10));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "a lookalike is not trusted: {}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&fake);

    // A uid not on the list: refused at connect, told why, audited once per burst.
    let mut refused = 0;
    for _ in 0..5 {
        let out = run_bounded(
            &mut bare_preload(&other, &root, "curl -sS -i https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"", false),
            Duration::from_secs(30),
        );
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains("403")
                && shown.contains(&format!("uid {} may not use the system broker", other.uid)),
            "{}",
            text(&out)
        );
        refused += 1;
    }
    let audit = root.audit_until("uid_refused", 1);
    assert_eq!(
        count_events(&audit, "uid_refused"),
        1,
        "{refused} refusals, one audit line: {audit}"
    );
    assert!(audit.contains(&format!("\"uid\":{}", other.uid)));
    // Its handover is refused too, in the shim's one stderr line.
    let out = run_bounded(
        bare_preload(&other, &root, "true", false)
            .env("OPENAI_API_KEY", "sk-other-user-key-0123456789abcdef01"),
        Duration::from_secs(30),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not use the system broker"),
        "{}",
        text(&out)
    );
    assert_eq!(
        openai.requests().len(),
        served + 1,
        "no request of the refused uid reached the origin"
    );

    // The CONNECT fallback (what Go and static programs get): the same uid check and policy.
    let shared = broker_contract::ShimConfig::parse(
        &std::fs::read_to_string(root.run_dir().join("shim.conf")).expect("shim.conf"),
    )
    .expect("parses");
    let proxy = broker_contract::connect_proxy_url(
        shared.connect_proxy.as_deref().expect("a CONNECT listener"),
        shared.ticket.as_ref(),
    );
    let placeholder = shared
        .env
        .iter()
        .find(|(var, _)| var == "OPENAI_API_KEY")
        .map(|(_, p)| p.clone())
        .expect("placeholder");
    let through_connect = |user: &TestUser| -> Output {
        let mut cmd = user.command("/usr/bin/curl");
        cmd.args(["-sS", "--fail-with-body", "--proxy", &proxy, "--cacert"])
            .arg(&shared.ca_file)
            .args(["https://api.openai.com/v1/models", "-H"])
            .arg(format!("Authorization: Bearer {placeholder}"));
        run_bounded(&mut cmd, Duration::from_secs(30))
    };
    let out = through_connect(&agent);
    assert!(
        out.status.success() && out.stdout == b"ok",
        "CONNECT as the agent: {}",
        text(&out)
    );
    let out = through_connect(&other);
    assert!(
        !out.status.success(),
        "CONNECT as a uid not on the list: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        text(&out)
    );
    assert_eq!(openai.requests().len(), served + 2);

    // One uid may hold 16 handover runs at once; the 17th is refused with the reason.
    let mut holders: Vec<Child> = (0..16)
        .map(|_| {
            bare_preload(&agent, &root, "exec sleep 60", false)
                .env("GROQ_API_KEY", GROQ_KEY)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn a run holder")
        })
        .collect();
    let runs = root.run_dir().join("runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&runs).map_or(0, |d| d.count()) < 16 {
        assert!(
            Instant::now() < deadline,
            "16 runs did not open: {}",
            broker.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run_bounded(
        bare_preload(&agent, &root, "true", false).env("GROQ_API_KEY", GROQ_KEY),
        Duration::from_secs(30),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already holds 16 runs"),
        "{}",
        text(&out)
    );
    for holder in &mut holders {
        let _ = holder.kill();
        let _ = holder.wait();
    }

    // The admin removes the key: the agent no longer gets the placeholder, and a call that
    // still carries it (an agent that kept it) is told who can add one.
    let out = admin_cli(&["remove", "openai", "--system"], "");
    assert!(out.status.success(), "admin remove: {}", text(&out));
    let out = run_bounded(
        &mut bare_preload(
            &agent,
            &root,
            "echo \"openai=${OPENAI_API_KEY-unset}\"",
            false,
        ),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "openai=unset",
        "{}",
        text(&out)
    );
    let out = run_bounded(
        &mut bare_preload(&agent, &root, "curl -sS -i https://api.openai.com/v1/models -H \"Authorization: Bearer sk-broker-placeholder-openai-0000000000000000\"", false),
        Duration::from_secs(30),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("401")
            && shown.contains("an administrator runs 'broker add openai --system'"),
        "{}",
        text(&out)
    );
    let audit = root.audit_until("credential_removed", 1);
    assert!(audit.contains(&format!("\"uid\":{}", admin.uid)), "{audit}");

    // Installing again keeps the config and the key as they are.
    let config_before = std::fs::read(root.etc_dir().join("config.toml")).expect("config");
    let key_before = std::fs::read(root.etc_dir().join("master.key")).expect("key");
    let out = run_bounded(
        Command::new(broker_integration::broker_bin())
            .args([
                "system",
                "install",
                "--no-unit",
                "--user",
                &broker_name,
                "--root",
            ])
            .arg(&root.0),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "install again: {}", text(&out));
    assert_eq!(
        std::fs::read(root.etc_dir().join("config.toml")).expect("config"),
        config_before
    );
    assert_eq!(
        std::fs::read(root.etc_dir().join("master.key")).expect("key"),
        key_before
    );

    // No key anywhere the agent can read.
    for file in [
        root.run_dir().join("shim.conf"),
        root.run_dir().join("ca.pem"),
        root.0.join("broker.stderr"),
    ] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !broker_integration::contains(&bytes, OPENAI_KEY),
            "{}",
            file.display()
        );
    }
    drop(broker);
    drop(broker_user);
}

#[test]
fn a_system_broker_refuses_a_config_root_does_not_own() {
    if skip_unless_root("a_system_broker_refuses_a_config_root_does_not_own") {
        return;
    }
    let root = SystemRoot::new("cfg");
    let user = TestUser::create(&tag("c"));
    std::fs::create_dir_all(root.etc_dir()).expect("etc");
    let config = root.etc_dir().join("config.toml");
    write_root_file(&config, "[access]\n", 0o666);
    let run = |cmd: &mut Command| run_bounded(cmd, Duration::from_secs(30));
    let serve = || {
        let mut cmd = user.command(broker_bin_for_agent_user());
        cmd.args(["serve", "--system", "--system-root"])
            .arg(&root.0);
        cmd
    };
    let out = run(&mut serve());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writable by group or others"),
        "{}",
        text(&out)
    );
    // Root's, but a planted provider file that is the user's own: refused, named.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::create_dir_all(root.etc_dir().join("providers")).expect("providers");
    let planted = root.etc_dir().join("providers/evil.toml");
    std::fs::write(&planted, "name = \"evil\"\n").expect("write");
    std::os::unix::fs::chown(&planted, Some(user.uid), Some(user.gid)).expect("chown");
    let out = run(&mut serve());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("evil.toml"),
        "{}",
        text(&out)
    );
    // As root: refused, it must run as its own user.
    let out = run(Command::new(broker_integration::broker_bin())
        .args(["serve", "--system", "--system-root"])
        .arg(&root.0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not as root"),
        "{}",
        text(&out)
    );
}

/// The unit `broker system install` writes passes `systemd-analyze verify` where systemd's
/// tools are installed (CI installs them).
#[test]
fn the_system_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = broker_integration::which("systemd-analyze") else {
        broker_integration::skip("no systemd-analyze to verify the system unit with");
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let out = run_bounded(
        Command::new(broker_integration::broker_bin())
            .args(["system", "unit", "--user", "root", "--binary"])
            .arg(broker_integration::broker_bin()),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out));
    let unit = dir.path().join("broker.service");
    std::fs::write(&unit, &out.stdout).expect("write unit");
    let out = run_bounded(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&unit),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    // verify warns (exit 0) on some problems; none may concern the unit.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("broker.service:"), "{stderr}");
}

/// Allowed uids share the system broker's bare-preload run, but not its connections: each uid
/// has a share of its own. One agent uid holds open more connections than its share (the
/// broker at a descriptor limit of 512: a share is 32); it is refused past its share, told
/// why, audited, and another uid's agent is still served.
#[test]
fn one_uid_that_fills_its_connection_share_leaves_the_others_served() {
    if skip_unless_root("one_uid_that_fills_its_connection_share_leaves_the_others_served") {
        return;
    }
    const SHARE: usize = (512 - 256) / 2 / 4;
    let ca = TestCa::new();
    let openai = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "ok");
    let root = SystemRoot::new("caps");
    let (broker_name, flood_name, calm_name, admin_name) =
        (tag("cb"), tag("cf"), tag("cc"), tag("cm"));
    let flooder = TestUser::create(&flood_name);
    let calm = TestUser::create(&calm_name);
    let admin = TestUser::create(&admin_name);
    let _ = Command::new("userdel").arg(&broker_name).output();
    let _ = Command::new("groupdel").arg(&broker_name).output();
    let out = run_bounded(
        Command::new(broker_integration::broker_bin())
            .args(["system", "install", "--no-unit", "--user", &broker_name])
            .args([
                "--allow-user",
                &flood_name,
                "--allow-user",
                &calm_name,
                "--root",
            ])
            .arg(&root.0),
        Duration::from_secs(30),
    );
    let broker_user = TestUser::existing(&broker_name);
    assert!(out.status.success(), "install: {}", text(&out));
    write_root_file(
        &root.etc_dir().join("config.toml"),
        &format!(
            "[access]\nusers = [\"{flood_name}\", \"{calm_name}\"]\nadmin_users = [\"{admin_name}\"]\n\
             [[policy]]\nusers = [\"{flood_name}\", \"{calm_name}\"]\nproviders = [\"openai\"]\n"
        ),
        0o644,
    );
    let mut args = root.upstream_args(&ca, &[("api.openai.com", openai.addr)]);
    // The flood's connections stay for the whole test.
    args.extend(["--request-head-timeout".into(), "600".into()]);
    let broker = SystemBroker::start_limited(&root, &broker_user, &args, Some(512));
    let mut add = admin.command(broker_bin_for_agent_user());
    add.args(["add", "openai", "--system"])
        .env(broker_contract::ENV_SYSTEM_RUN, root.run_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = add.spawn().expect("spawn");
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(OPENAI_KEY.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "admin add: {}", text(&out));

    // The flooding agent: twice its share of connections that finish TLS and send nothing,
    // held open until its stdin closes.
    const FLOOD: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context()
held = []
for i in range(2 * SHARE):
    try:
        s = ctx.wrap_socket(socket.create_connection(("api.openai.com", 443), timeout=10), server_hostname="api.openai.com")
        held.append(s)
    except Exception:
        pass
print("held", len(held), flush=True)
sys.stdin.read()
"#;
    let mut flood = bare_preload(
        &flooder,
        &root,
        &format!(
            "exec /usr/bin/python3 -c '{}'",
            FLOOD.replace("SHARE", &SHARE.to_string())
        ),
        true,
    );
    let mut flood = flood
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flood");
    let mut line = String::new();
    {
        use std::io::BufRead as _;
        let stdout = flood.stdout.as_mut().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read");
    }
    let held: usize = line
        .trim()
        .strip_prefix("held ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("flood said {line:?}; broker: {}", broker.stderr()));
    assert!(held >= SHARE, "the flood holds its share: {line}");
    // More runs of its own (a shim that hands over a key opens one per process tree) give
    // the flooding uid no more: its share counts across all its runs. Without that, these
    // three would fill the global cap (four runs' worth) and the other uid would be refused.
    let mut more: Vec<std::process::Child> = (0..3)
        .map(|i| {
            let mut cmd = bare_preload(
                &flooder,
                &root,
                &format!(
                    "exec /usr/bin/python3 -c '{}'",
                    FLOOD.replace("SHARE", &SHARE.to_string())
                ),
                true,
            );
            cmd.env(
                "OPENAI_API_KEY",
                format!("sk-flood-handover-{i}-0123456789abcdef0123"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("flood in a run of its own")
        })
        .collect();
    for child in &mut more {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert!(
            line.starts_with("held "),
            "{line:?}; broker: {}",
            broker.stderr()
        );
    }

    // The other uid is served meanwhile.
    let out = run_bounded(
        &mut bare_preload(&calm, &root, CURL, false),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}\nbroker: {}",
        text(&out),
        broker.stderr()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");

    // The flooding uid is told why (retried: while many refusals are being told at once, one
    // more is closed without a word).
    let script = "curl -sS -o /dev/null -D - https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"";
    let told = (0..20)
        .find_map(|_| {
            let out = run_bounded(
                &mut bare_preload(&flooder, &root, script, false),
                Duration::from_secs(60),
            );
            let shown = String::from_utf8_lossy(&out.stdout).into_owned();
            if shown.contains(" 503") {
                return Some(shown);
            }
            std::thread::sleep(Duration::from_millis(500));
            None
        })
        .expect("the flooding uid is told it is over its share");
    assert!(
        told.contains(&format!(
            "uid {} has {SHARE} connections open to the system broker, the most one uid may hold",
            flooder.uid
        )),
        "{told}"
    );
    let audit = root.audit_until("connection_limit", 1);
    assert!(
        audit.lines().any(|l| l.contains("\"connection_limit\"")
            && l.contains(&format!("uid {}", flooder.uid))
            && l.contains(&format!("\"uid\":{}", flooder.uid))),
        "{audit}"
    );
    assert_eq!(
        openai.requests().len(),
        1,
        "only the other uid's request went upstream"
    );
    drop(flood.stdin.take());
    let _ = flood.wait();
    for mut child in more {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    drop(broker);
    drop(broker_user);
}

/// `broker ARGS` with no system broker to talk to (a run directory that holds none): the
/// CLI must refuse on its own, exit 1, and say why; its stderr.
fn refused_by_the_cli(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let mut cmd = Command::new(broker_integration::broker_bin());
    scrub(&mut cmd);
    cmd.env(broker_contract::ENV_SYSTEM_RUN, dir.path())
        .args(args)
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--from-command` with `--system` is refused before anything is sent, saying why (the
/// command would run as the broker's user, which holds every user's keys) and what to do.
/// Needs no root: nothing is started.
#[test]
fn from_command_keys_are_refused_for_the_system_broker() {
    let stderr = refused_by_the_cli(&[
        "add",
        "openai",
        "--system",
        "--from-command",
        "pass show openai",
    ]);
    assert!(
        stderr.contains("refused with --system")
            && stderr.contains("holds every user's keys")
            && stderr.contains("| broker add openai --system"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("pass show"),
        "the command is not echoed: {stderr}"
    );
}

const ACME_CURL: &str = "curl -sS --fail-with-body https://api.acme.test/v1/me -H \"Authorization: Bearer $ACME_TOKEN\"";
const ACME_PYTHON: &str = "/usr/bin/python3 -c 'import os, urllib.request; r = urllib.request.Request(\"https://api.acme.test/v1/me\", headers={\"Authorization\": \"Bearer \" + os.environ[\"ACME_TOKEN\"]}); print(urllib.request.urlopen(r).read().decode(), end=\"\")'";

/// An admin logs the system broker in with OAuth (`broker login --system --device` against a
/// real oidc-provider; the client id from root's config, the endpoints from root's provider
/// file): an allowed agent uid's bare preload reaches the API with the access token, the
/// system broker refreshes it before it expires and the API sees the new one, the agent uid
/// can neither log the broker in nor out (refused, audited), no token shows in anything the
/// admin's CLI printed, the audit log or the agent's environment, and `logout --system`
/// revokes the tokens at the server and leaves the agent a clear error.
#[test]
fn an_admin_logs_the_system_broker_in_with_oauth_and_it_refreshes() {
    if skip_unless_root("an_admin_logs_the_system_broker_in_with_oauth_and_it_refreshes") {
        return;
    }
    // Logins get 20 s access tokens (refreshed in their last 10 s); refreshed ones an hour.
    let Some(idp) = OAuthServer::start(&[("FIRST_TTL", "20"), ("REFRESH_TTL", "3600")]) else {
        return;
    };
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let root = SystemRoot::new("oauth");
    let (broker_name, agent_name, admin_name) = (tag("ob"), tag("oa"), tag("om"));
    let agent = TestUser::create(&agent_name);
    let admin = TestUser::create(&admin_name);
    let _ = Command::new("userdel").arg(&broker_name).output();
    let _ = Command::new("groupdel").arg(&broker_name).output();
    let out = run_bounded(
        Command::new(broker_integration::broker_bin())
            .args(["system", "install", "--no-unit", "--user", &broker_name])
            .args(["--allow-user", &agent_name, "--root"])
            .arg(&root.0),
        Duration::from_secs(30),
    );
    let broker_user = TestUser::existing(&broker_name);
    assert!(out.status.success(), "install: {}", text(&out));
    // Root's: the client id in the config, the endpoints in a provider file.
    write_root_file(
        &root.etc_dir().join("config.toml"),
        &format!(
            "[access]\nusers = [\"{agent_name}\"]\nadmin_users = [\"{admin_name}\"]\n\
             [[policy]]\nusers = [\"{agent_name}\"]\nproviders = [\"acme\"]\n\
             [oauth.acme]\nclient_id = \"broker-test\"\n"
        ),
        0o644,
    );
    let providers = root.etc_dir().join("providers");
    std::fs::create_dir_all(&providers).expect("providers");
    std::fs::set_permissions(&providers, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    write_root_file(
        &providers.join("acme.toml"),
        &idp.provider_toml("client_auth = \"none\""),
        0o644,
    );
    let broker = SystemBroker::start(
        &root,
        &broker_user,
        &root.upstream_args(&ca, &[(API_HOST, origin.addr)]),
    );
    let cli = |user: &TestUser, args: &[&str]| -> Command {
        let mut cmd = user.command(broker_bin_for_agent_user());
        cmd.args(args)
            .env(broker_contract::ENV_SYSTEM_RUN, root.run_dir())
            .stdin(Stdio::null());
        cmd
    };
    let device_requests = || {
        idp.entries()
            .iter()
            .filter(|e| e["event"] == "request" && e["path"] == "/device/auth")
            .count()
    };

    // The agent's uid cannot log the broker in: refused before any OAuth server is asked.
    let out = run_bounded(
        &mut cli(
            &agent,
            &["login", "acme", "--system", "--device", "--no-browser"],
        ),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "the agent logged in: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "uid {} is not an administrator of the system broker",
            agent.uid
        )),
        "{}",
        text(&out)
    );
    assert_eq!(device_requests(), 0, "the refused login reached the server");
    let audit = root.audit_until("admin_refused", 1);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"admin_refused\"")
                && l.contains(&format!("\"uid\":{}", agent.uid))),
        "{audit}"
    );

    // The admin: the device flow runs in the admin's CLI, the tokens go to the broker.
    let (ok, admin_stderr, admin_stdout) = drive_login(
        &mut cli(
            &admin,
            &[
                "login",
                "acme",
                "--system",
                "--device",
                "--no-browser",
                "--timeout",
                "60",
            ],
        ),
        "user_code=",
        &[],
    );
    assert!(
        ok,
        "broker login --system failed:\n{admin_stderr}\nbroker: {}",
        broker.stderr()
    );
    let logged_in = Instant::now();
    assert!(
        admin_stderr.contains("Logged the system broker in to ACME")
            && admin_stderr.contains("refresh token"),
        "{admin_stderr}"
    );
    assert_eq!(
        idp.token_events("urn:ietf:params:oauth:grant-type:device_code"),
        1
    );

    // The agent's bare preload: curl and Python get the API with the access token.
    for script in [ACME_CURL, ACME_PYTHON] {
        let out = run_bounded(
            &mut bare_preload(&agent, &root, script, false),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success() && out.stdout == b"{\"ok\":true}",
            "{}\nbroker: {}",
            text(&out),
            broker.stderr()
        );
    }
    assert!(
        logged_in.elapsed() < Duration::from_secs(10),
        "the first calls took past the refresh margin: the test cannot tell the tokens apart"
    );
    let first = tokens_seen(&origin);
    assert_eq!(first.len(), 2);
    assert_eq!(first[0], first[1], "one access token, not refreshed yet");
    assert!(idp.token_is_live(&first[0]));
    assert_eq!(idp.token_events("refresh_token"), 0);

    // Past half the token's life the system broker refreshes it before using it.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(logged_in.elapsed()));
    let out = run_bounded(
        &mut bare_preload(&agent, &root, ACME_CURL, false),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success() && out.stdout == b"{\"ok\":true}",
        "after the refresh margin: {}\nbroker: {}",
        text(&out),
        broker.stderr()
    );
    let tokens = tokens_seen(&origin);
    assert_eq!(tokens.len(), 3);
    assert_ne!(tokens[2], first[0], "the API got the refreshed token");
    assert!(idp.token_is_live(&tokens[2]));
    assert_eq!(idp.token_events("refresh_token"), 1, "{:?}", idp.entries());
    root.audit_until("refresh", 1);

    // What the admin and `broker doctor` see: the login, never a token.
    let list = run_bounded(
        &mut cli(&admin, &["list", "--system", "--json"]),
        Duration::from_secs(30),
    );
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).expect("list json");
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["provider"] == "acme"
                && c["kind"] == "oauth2"
                && c["expires_at"].is_string())),
        "{listed}"
    );
    let doctor = run_bounded(
        &mut cli(&admin, &["doctor", "--no-self-test", "--json"]),
        Duration::from_secs(60),
    );
    let shown = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        shown.contains("system broker logins") && shown.contains("acme (profile default"),
        "{shown}"
    );

    // The agent's uid cannot log the broker out either.
    let out = run_bounded(
        &mut cli(&agent, &["logout", "acme", "--system"]),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "the agent logged out: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not an administrator"),
        "{}",
        text(&out)
    );
    // No token in the agent's environment, the admin's CLI output, the listings, the audit
    // log, or the broker's log.
    let env = run_bounded(
        &mut bare_preload(&agent, &root, "env", false),
        Duration::from_secs(30),
    );
    assert!(
        String::from_utf8_lossy(&env.stdout).contains("ACME_TOKEN=acme-broker-placeholder"),
        "{}",
        text(&env)
    );
    for token in &tokens {
        let raw = token.trim_start_matches("Bearer ");
        for (what, bytes) in [
            ("the agent's environment", env.stdout.clone()),
            (
                "the admin's login output",
                admin_stderr.clone().into_bytes(),
            ),
            ("the admin's login stdout", admin_stdout.clone()),
            ("the admin's list", list.stdout.clone()),
            ("doctor", doctor.stdout.clone()),
            ("the audit log", root.audit().into_bytes()),
            ("the broker's log", broker.stderr().into_bytes()),
        ] {
            assert!(
                !broker_integration::contains(&bytes, raw),
                "a token in {what}"
            );
        }
    }

    // The admin logs the broker out: revoked at the server, removed, audited.
    let out = run_bounded(
        &mut cli(&admin, &["logout", "acme", "--system"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "logout --system: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Revoked the refresh token"),
        "{}",
        text(&out)
    );
    assert_eq!(
        idp.revocations(),
        (2, true),
        "refresh and access token revoked at the server: {:?}",
        idp.entries()
    );
    assert!(!idp.token_is_live(&tokens[2]));
    let audit = root.audit_until("logout", 1);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"logout\"") && l.contains(&format!("\"uid\":{}", admin.uid))),
        "{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"login\"") && l.contains(&format!("\"uid\":{}", admin.uid))),
        "{audit}"
    );
    // The agent no longer gets the placeholder; one that kept it is told who can log in.
    let out = run_bounded(
        &mut bare_preload(&agent, &root, "echo \"acme=${ACME_TOKEN-unset}\"", false),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "acme=unset",
        "{}",
        text(&out)
    );
    let out = run_bounded(
        &mut bare_preload(
            &agent,
            &root,
            "curl -sS -i https://api.acme.test/v1/me -H \"Authorization: Bearer acme-broker-placeholder-0000\"",
            false,
        ),
        Duration::from_secs(30),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("401")
            && shown.contains("an administrator runs 'broker login acme --system'"),
        "{}",
        text(&out)
    );
    assert_eq!(origin.requests().len(), 3, "nothing more reached the API");

    // The browser flow works too: PKCE, with the loopback redirect in the admin's CLI.
    let (ok, admin_stderr, _) = drive_login(
        &mut cli(
            &admin,
            &[
                "login",
                "acme",
                "--system",
                "--no-browser",
                "--timeout",
                "60",
            ],
        ),
        "/auth?",
        &[],
    );
    assert!(
        ok && admin_stderr.contains("code_challenge_method=S256"),
        "broker login --system (PKCE) failed:\n{admin_stderr}\nbroker: {}",
        broker.stderr()
    );
    assert_eq!(idp.token_events("authorization_code"), 1);
    let out = run_bounded(
        &mut bare_preload(&agent, &root, ACME_CURL, false),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success() && out.stdout == b"{\"ok\":true}",
        "after the PKCE login: {}",
        text(&out)
    );
    let last = tokens_seen(&origin).pop().expect("a token");
    assert!(!tokens.contains(&last) && idp.token_is_live(&last));
    assert!(!admin_stderr.contains(last.trim_start_matches("Bearer ")));
    drop(broker);
    drop(broker_user);
}

/// `--client-id` with `--system` is refused before anything is sent: the system broker's
/// OAuth client is root's to choose. Needs no root: nothing is started.
#[test]
fn a_client_id_is_refused_for_the_system_broker() {
    let stderr = refused_by_the_cli(&[
        "login",
        "github",
        "--system",
        "--client-id",
        "Iv1.someone-else",
    ]);
    assert!(
        stderr.contains("--client-id is refused with --system")
            && stderr.contains("[oauth.github]")
            && stderr.contains("/etc/broker/config.toml"),
        "{stderr}"
    );
}
