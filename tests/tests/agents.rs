//! The real agent CLIs under `broker run`: Codex, Claude Code, Gemini CLI, opencode, llm and
//! aider, at the versions `scripts/test` installs (tests/agents/), each making one model call
//! in its non-interactive mode against a fake provider on the provider's real hostname
//! (`broker_integration::fake_llm`).
//!
//! For each agent, run once with this machine's CA variables scrubbed (the shim alone must
//! make TLS work) and once with them preset (the merge rules must hold), and check:
//! - the agent printed the fake provider's answer (which it gives only for the real key);
//! - the fake provider saw the real key on every request, never a placeholder;
//! - every process of the agent's tree saw only the placeholder: no environment block (read
//!   from `/proc/<pid>/environ`, as an attacker with the agent's uid could) or command line
//!   holds the real key, and the agent's own processes hold the placeholder in the
//!   provider's variable;
//! - nothing the agent printed holds the key;
//! - every request the fake provider answered is one audited credential use;
//! - no process resolved the provider's hostname itself (a DNS query for it, seen by
//!   `strace`): a resolver that bypasses the shim's `getaddrinfo` sends its requests around
//!   the broker, with the placeholder.
//!
//! Each agent gets a throwaway HOME, with its telemetry, update checks and anything else
//! that would reach past the fake provider turned off by its own variables or config files:
//! there is no outside network here, and a test must not depend on one.
//!
//! Where `scripts/test` could not install the CLIs (no registry), each test prints a SKIP
//! line saying so and passes; a CLI missing for any other reason fails the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_integration::fake_llm::{FakeLlm, Provider};
use broker_integration::{
    agent_clients, contains, count_events, preset_ca_vars, shim_lib, Home, TestCa,
};

// Throwaway keys in each provider's real format (never printed: messages name the key's
// presence, not its value).
const OPENAI_KEY: &str = "sk-proj-agentstest0openai0Xb3c9Qd2Lr8Tz1Vw6Ny4";
const ANTHROPIC_KEY: &str = "sk-ant-api03-agentstest0anthropic0Hq7Fm2Kp9Wc4Rx1Lz6";
const GEMINI_KEY: &str = "AIzaSyAgentsTest0gemini0Jd8Qn3Tv5Wb2Xk";

/// How long one agent run may take: a debug broker, a cold Node or Python start.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// One agent CLI: how to start it for one model call, and what it needs in its HOME.
struct Agent {
    name: &'static str,
    provider: Provider,
    /// The program, relative to `target/clients`.
    program: &'static str,
    args: Vec<String>,
    /// Variables for the agent (on top of HOME and the XDG directories, which point into
    /// its throwaway HOME).
    env: Vec<(&'static str, String)>,
    /// Config files to write, relative to the throwaway HOME.
    files: Vec<(&'static str, String)>,
    /// What the agent must not print (warnings broker's environment must not cause).
    must_not_print: Vec<&'static str>,
    /// Run the agent under `strace` and fail on a DNS query for the provider's host: a
    /// resolver that bypasses the shim, and so the broker. Off only for a static program started directly: `broker run` must see the
    /// program itself to give it the CONNECT fallback.
    trace: bool,
}

/// The real key for `provider`.
fn key_for(provider: Provider) -> &'static str {
    match provider {
        Provider::OpenAi => OPENAI_KEY,
        Provider::Anthropic => ANTHROPIC_KEY,
        Provider::Gemini => GEMINI_KEY,
    }
}

/// Is this request a model call (not a models list or other side request)?
fn is_model_call(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    path == "/v1/responses"
        || path == "/v1/chat/completions"
        || path == "/v1/messages"
        || path.ends_with(":generateContent")
        || path.ends_with(":streamGenerateContent")
}

/// The shared driver: run `agent` under `broker run` twice (CA variables scrubbed, then
/// preset) against a fake provider, and check everything the module doc lists.
fn drive(agent: Agent) {
    let clients = match agent_clients() {
        Ok(dir) => dir,
        Err(reason) => {
            let why = format!("{}: the agent CLIs are not installed: {reason}", agent.name);
            println!("SKIP {why}");
            broker_integration::skip(&why);
            return;
        }
    };
    let program = clients.join(agent.program);
    if !program.exists() {
        if std::env::var_os("BROKER_TEST_AGENT_CLIENTS").is_some() {
            panic!(
                "{} is missing although scripts/test installed the agent CLIs into {}",
                program.display(),
                clients.display()
            );
        }
        let why = format!(
            "SKIP {}: {} is not installed (./scripts/test installs the agent CLIs)",
            agent.name,
            program.display()
        );
        println!("{why}");
        broker_integration::skip(&why);
        return;
    }
    let _ = shim_lib();
    let provider = agent.provider;
    let key = key_for(provider);
    let ca = TestCa::new();
    let fake = FakeLlm::start(&ca, provider, key);
    let home = Home::new();
    home.add(provider.name(), key);
    let placeholder = home.placeholder(provider.name());
    // The variables the broker puts the provider's placeholder in (from its catalog).
    let catalog = home.broker_ok(&["providers", "show", provider.name(), "--json"]);
    let catalog: serde_json::Value = serde_json::from_slice(&catalog.stdout).expect("catalog");
    let provider_vars: Vec<String> = catalog["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();

    for preset in [false, true] {
        let before = fake.requests().len();
        let agent_home = tempfile::tempdir().expect("agent home");
        let project = agent_home.path().join("project");
        std::fs::create_dir_all(&project).expect("project dir");
        for (file, text) in &agent.files {
            let path = agent_home.path().join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("config dir");
            std::fs::write(
                &path,
                text.replace("{HOME}", &agent_home.path().to_string_lossy()),
            )
            .expect("config file");
        }
        let mut cmd = home.broker_run(&ca, provider.host(), fake.origin.addr);
        cmd.arg("--");
        let trace_file = agent_home.path().join("out").join("trace");
        if agent.trace {
            // Every process's sends, bytes in hex, for DNS queries (see `bypasses`).
            let strace = broker_integration::which("strace")
                .expect("strace is needed to check that no request went around the broker");
            cmd.arg(strace)
                .args(["-f", "-qq", "-xx", "-s", "256", "-o"])
                .arg(&trace_file)
                .args(["-e", "trace=connect,sendto,sendmsg,sendmmsg,write,writev"]);
        }
        cmd.arg(&program).args(&agent.args);
        cmd.current_dir(&project);
        // A throwaway HOME: the agent's settings, caches and state stay in it.
        let h = agent_home.path();
        cmd.env("HOME", h)
            .env("XDG_CONFIG_HOME", h.join(".config"))
            .env("XDG_DATA_HOME", h.join(".local/share"))
            .env("XDG_STATE_HOME", h.join(".local/state"))
            .env("XDG_CACHE_HOME", h.join(".cache"))
            // No colours or terminal tricks in captured output.
            .env("NO_COLOR", "1")
            .env("TERM", "dumb");
        // Keys this machine may hold for real must not reach the agent: the broker's
        // placeholders are what it should see.
        for var in [
            "OPENAI_API_KEY",
            "CODEX_API_KEY",
            "ANTHROPIC_API_KEY",
            "GEMINI_API_KEY",
            "GOOGLE_API_KEY",
        ] {
            cmd.env_remove(var);
        }
        for (var, value) in &agent.env {
            cmd.env(var, value.replace("{HOME}", &h.to_string_lossy()));
        }
        if preset {
            preset_ca_vars(&mut cmd);
        }
        let started = Instant::now();
        let run = run_watching(&mut cmd, &agent_home.path().join("out"));
        let took = started.elapsed();
        let case = format!(
            "{} ({}, CA variables {})",
            agent.name,
            provider.name(),
            if preset { "preset" } else { "scrubbed" }
        );
        let requests: Vec<_> = fake.requests().into_iter().skip(before).collect();
        // What the CLI asked for, and where it carried the key (never the key itself).
        let paths: Vec<String> = fake
            .paths()
            .into_iter()
            .skip(before)
            .zip(&requests)
            .map(|(path, req)| format!("{path} [{}]", provider.credential_summary(req, key)))
            .collect();
        println!("{case}: requests to the fake provider: {paths:#?}");
        // For finding out what a new version of a CLI sends: each request's body, to files.
        if let Some(dir) = std::env::var_os("BROKER_TEST_AGENTS_DUMP") {
            let dir = PathBuf::from(dir).join(agent.name);
            std::fs::create_dir_all(&dir).expect("dump dir");
            for (i, req) in requests.iter().enumerate() {
                let name = format!("{}-{i}-{}", u8::from(preset), req.method);
                std::fs::write(dir.join(name), &req.body).expect("dump");
            }
            let name = u8::from(preset);
            std::fs::write(dir.join(format!("{name}-stdout")), &run.stdout).expect("dump");
            std::fs::write(dir.join(format!("{name}-stderr")), &run.stderr).expect("dump");
        }
        let report = format!(
            "{case}\nexit: {:?}\nrequests to the fake {}: {paths:#?}\nstdout:\n{}\nstderr:\n{}",
            run.status,
            provider.name(),
            run.stdout,
            run.stderr
        );
        // Nothing the agent printed holds the key (checked first: the report prints output).
        assert!(
            !run.stdout.contains(key) && !run.stderr.contains(key),
            "{case}: the agent printed the real key"
        );
        for p in &run.processes {
            assert!(
                !p.environ_has_key && !p.cmdline_has_key,
                "{case}: process {} ({}) held the real key in its {}",
                p.pid,
                p.exe,
                if p.environ_has_key {
                    "environment"
                } else {
                    "command line"
                }
            );
        }
        // The fake saw the real key on every request (a placeholder there means the broker
        // let a request past the swap), and at least one model call.
        for req in &requests {
            assert!(
                provider.has_key(req, key),
                "{case}: {} {} reached the fake provider with {}\n{report}",
                req.method,
                req.target.split('?').next().unwrap_or_default(),
                provider.credential_summary(req, key)
            );
        }
        assert!(
            requests.iter().any(|r| is_model_call(&r.target)),
            "{case}: no model call reached the fake provider\n{report}"
        );
        assert!(
            run.stdout.contains(provider.answer()),
            "{case}: the agent did not print the fake provider's answer\n{report}"
        );
        assert_eq!(run.status, Some(0), "{case}: exit status\n{report}");
        if agent.trace {
            let trace = std::fs::read(&trace_file).expect("strace output");
            let around = bypasses(&trace, provider.host());
            assert!(
                around.is_empty(),
                "{case}: the agent resolved {} itself, around the shim's getaddrinfo (its \
                 requests there go around the broker):\n{}\n{report}",
                provider.host(),
                around.join("\n")
            );
        }
        for text in &agent.must_not_print {
            assert!(
                !run.stdout.contains(text) && !run.stderr.contains(text),
                "{case}: the agent printed '{text}'\n{report}"
            );
        }
        // The agent's own processes (not the broker's) held the placeholder where the
        // provider's SDK looks for the key.
        let agent_procs: Vec<&Proc> = run
            .processes
            .iter()
            .filter(|p| !p.exe.ends_with("/broker"))
            .collect();
        assert!(
            agent_procs
                .iter()
                .any(|p| p.env_values.values().any(|v| v == &placeholder)),
            "{case}: no process of the agent held the placeholder: {:#?}",
            run.processes
        );
        for p in &agent_procs {
            for var in &provider_vars {
                if let Some(value) = p.env_values.get(var) {
                    assert!(
                        value == &placeholder,
                        "{case}: process {} ({}) had something other than the placeholder in {var}",
                        p.pid,
                        p.exe
                    );
                }
            }
        }
        // Every request the fake answered used the key once, and the audit says so (the
        // broker writes it in batches, a moment after the request).
        let total = fake.requests().len();
        let audit = home.audit_until(|a| count_events(a, "credential_use") >= total);
        assert_eq!(
            count_events(&audit, "credential_use"),
            total,
            "{case}: credential uses audited, against requests the fake provider answered\n{report}"
        );
        assert!(
            !audit.contains(key),
            "{case}: the real key is in the audit log"
        );
        let mut programs = BTreeMap::<&str, usize>::new();
        for p in &agent_procs {
            *programs.entry(p.exe.as_str()).or_default() += 1;
        }
        println!(
            "{case}: ok in {:.1} s; the agent's processes checked, by program: {programs:?}",
            took.as_secs_f64()
        );
    }
}

/// A process of the agent's tree as the test saw it while the run lasted.
#[derive(Debug)]
struct Proc {
    pid: u32,
    exe: String,
    environ_has_key: bool,
    cmdline_has_key: bool,
    /// The API key variables in its environment.
    env_values: BTreeMap<String, String>,
}

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    processes: Vec<Proc>,
}

/// Run `cmd` (output to files in `dir`, so a chatty agent cannot fill a pipe), and while it
/// runs, read the environment and command line of every process below it, each once. A
/// process that lives less than the poll interval may be missed; the agents' own processes
/// (launchers, runtimes, the CLIs) live for the whole model call.
fn run_watching(cmd: &mut Command, dir: &Path) -> Run {
    std::fs::create_dir_all(dir).expect("out dir");
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout"))
        .stderr(std::fs::File::create(&err_path).expect("stderr"))
        .spawn()
        .expect("spawn broker run");
    let root = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(BTreeMap::<u32, Proc>::new()));
    let watcher = {
        let (done, seen) = (done.clone(), seen.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                for pid in descendants(root) {
                    let mut seen = seen.lock().expect("lock");
                    if seen.contains_key(&pid) {
                        continue;
                    }
                    if let Some(p) = inspect(pid) {
                        seen.insert(pid, p);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    done.store(true, Ordering::SeqCst);
    watcher.join().expect("watcher");
    let processes = std::mem::take(&mut *seen.lock().expect("lock"))
        .into_values()
        .collect();
    Run {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        processes,
    }
}

/// Every process below `root` (by parent pid, from `/proc/<pid>/stat`).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        parent.insert(pid, ppid);
    }
    parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut at = pid;
            while let Some(&up) = parent.get(&at) {
                if up == root {
                    return true;
                }
                if up <= 1 {
                    return false;
                }
                at = up;
            }
            false
        })
        .collect()
}

/// What process `pid` holds: whether its environment or command line has any of the real
/// keys, and the provider variables it has.
fn inspect(pid: u32) -> Option<Proc> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let keys = [OPENAI_KEY, ANTHROPIC_KEY, GEMINI_KEY];
    let env_values = environ
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
        .filter(|(k, _)| {
            [
                "OPENAI_API_KEY",
                "CODEX_API_KEY",
                "ANTHROPIC_API_KEY",
                "GEMINI_API_KEY",
                "GOOGLE_API_KEY",
            ]
            .contains(k)
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Proc {
        pid,
        exe,
        environ_has_key: keys.iter().any(|k| contains(&environ, k)),
        cmdline_has_key: keys.iter().any(|k| contains(&cmdline, k)),
        env_values,
    })
}

/// DNS queries for the provider's `host` sent to port 53, in strace's record of the agent
/// (`-xx`: every string's bytes as `\xNN`): a resolver of the agent's own, which the
/// shim's `getaddrinfo` never saw, asked a real DNS server (a loopback stub such as
/// systemd-resolved's counts), so the request it was for goes to the provider's real
/// address with the placeholder, around the broker (here, with no outside network, it fails
/// silently). A query the shim steers to the broker shows the broker's port instead. Each as
/// the strace line, decoded and cut short. (Connections to other hosts go out directly, as
/// they should: opencode, for one, fetches from the npm registry.)
fn bypasses(trace: &[u8], host: &str) -> Vec<String> {
    // The hostname as a DNS query carries it: length-prefixed labels.
    let mut wire = Vec::new();
    for label in host.split('.') {
        wire.push(label.len() as u8);
        wire.extend_from_slice(label.as_bytes());
    }
    // The port each socket was last connected to, by fd (threads share their fds; a number
    // reused by another process is overwritten by its own connect first).
    let mut connected: BTreeMap<u64, Option<u16>> = BTreeMap::new();
    let mut found = Vec::new();
    for line in trace.split(|&b| b == b'\n') {
        let line = unhex(line);
        let text = String::from_utf8_lossy(&line);
        // "<pid> <syscall>(<fd>, ..."
        let Some((call, rest)) = text
            .trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ')
            .split_once('(')
        else {
            continue;
        };
        let fd = rest
            .split(',')
            .next()
            .and_then(|f| f.trim().parse::<u64>().ok());
        let port = text
            .split_once("_port=htons(")
            .and_then(|(_, p)| p.split(')').next())
            .and_then(|p| p.parse::<u16>().ok());
        if call == "connect" {
            if let Some(fd) = fd {
                connected.insert(fd, port);
            }
            continue;
        }
        if !line.windows(wire.len()).any(|w| w == wire.as_slice()) {
            continue;
        }
        // The destination named in the send itself, else the socket's.
        let to = port.or_else(|| fd.and_then(|fd| connected.get(&fd).copied().flatten()));
        // Unknown (a socket connected before the trace began) counts as a real resolver.
        if to.is_none_or(|p| p == 53) {
            found.push(text.chars().take(300).collect());
        }
    }
    found
}

/// `\xNN` escapes (strace's `-xx`) decoded into bytes.
fn unhex(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] == b'\\' && line.get(i + 1) == Some(&b'x') {
            if let Some(byte) = line
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(line[i]);
        i += 1;
    }
    out
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const PROMPT: &str = "Reply with the single word pong.";

/// Codex: `exec` is its non-interactive mode; the throwaway project is no git repo.
fn codex_agent(program: &'static str, trace: bool) -> Agent {
    Agent {
        name: "codex",
        provider: Provider::OpenAi,
        program,
        args: args(&["exec", "--skip-git-repo-check", PROMPT]),
        env: vec![("CODEX_HOME", "{HOME}/.codex".into())],
        files: vec![(
            ".codex/config.toml",
            // No update check against GitHub, no analytics.
            "check_for_update_on_startup = false\n\
             [analytics]\nenabled = false\n"
                .into(),
        )],
        must_not_print: vec![],
        trace,
    }
}

/// Codex through its npm launcher (`codex` is `bin/codex.js`, which starts the package's
/// static musl binary): the way npm users start it.
#[test]
fn codex() {
    drive(codex_agent("agents/node_modules/.bin/codex", true));
}

/// Codex's static musl binary started directly: `broker run` sees a static program and
/// gives it the CONNECT fallback (`HTTPS_PROXY` and a CA bundle). Its model call goes over
/// the Responses API's WebSocket.
#[test]
fn codex_binary_started_directly() {
    drive(codex_agent(
        "agents/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex",
        false,
    ));
}

/// Claude Code's print mode.
#[test]
fn claude_code() {
    drive(Agent {
        name: "claude",
        provider: Provider::Anthropic,
        program: "agents/node_modules/.bin/claude",
        args: args(&["-p", PROMPT]),
        env: vec![
            // One switch for telemetry, error reporting, the auto-updater and the other
            // non-essential requests (to statsig, sentry, and so on).
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
            ("DISABLE_AUTOUPDATER", "1".into()),
            ("DISABLE_TELEMETRY", "1".into()),
            ("DISABLE_ERROR_REPORTING", "1".into()),
            ("CLAUDE_CONFIG_DIR", "{HOME}/.claude".into()),
        ],
        files: vec![],
        must_not_print: vec![],
        trace: true,
    });
}

/// Gemini CLI's prompt mode, with the API key as its auth.
#[test]
fn gemini_cli() {
    drive(Agent {
        name: "gemini",
        provider: Provider::Gemini,
        program: "agents/node_modules/.bin/gemini",
        args: args(&["-p", PROMPT]),
        env: vec![
            ("GEMINI_TELEMETRY_ENABLED", "false".into()),
            // Headless runs refuse an untrusted folder; the throwaway project is trusted.
            ("GEMINI_CLI_TRUST_WORKSPACE", "true".into()),
        ],
        files: vec![(
            ".gemini/settings.json",
            // Use the API key (not a Google login), no usage statistics, no update checks.
            r#"{
  "security": { "auth": { "selectedType": "gemini-api-key" } },
  "privacy": { "usageStatisticsEnabled": false },
  "general": { "disableAutoUpdate": true, "disableUpdateNag": true },
  "telemetry": { "enabled": false }
}"#
            .into(),
        )],
        // It warns on every run when both of Google's variables are set, as they were when
        // broker put placeholders in both.
        must_not_print: vec!["Both GOOGLE_API_KEY and GEMINI_API_KEY are set"],
        trace: true,
    });
}

/// opencode's `run`, with OpenAI as its provider.
#[test]
fn opencode() {
    drive(Agent {
        name: "opencode",
        provider: Provider::OpenAi,
        program: "agents/node_modules/.bin/opencode",
        args: args(&["run", "--model", "openai/gpt-4o-mini", PROMPT]),
        env: vec![
            // Its model catalog comes from models.dev, its default plugins from npm and its
            // updates from GitHub: none of that is the provider.
            ("OPENCODE_DISABLE_MODELS_FETCH", "1".into()),
            ("OPENCODE_DISABLE_AUTOUPDATE", "1".into()),
            ("OPENCODE_DISABLE_DEFAULT_PLUGINS", "1".into()),
            ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1".into()),
        ],
        files: vec![],
        must_not_print: vec![],
        trace: true,
    });
}

/// Simon Willison's `llm`, with an OpenAI model.
#[test]
fn llm() {
    drive(Agent {
        name: "llm",
        provider: Provider::OpenAi,
        program: "agents-venv/llm/bin/llm",
        args: args(&["-m", "gpt-4o-mini", PROMPT]),
        // Its logs database and keys file in the throwaway HOME.
        env: vec![("LLM_USER_PATH", "{HOME}/.llm".into())],
        files: vec![],
        must_not_print: vec![],
        trace: true,
    });
}

/// aider, one message and out.
#[test]
fn aider() {
    drive(Agent {
        name: "aider",
        provider: Provider::OpenAi,
        program: "agents-venv/aider-chat/bin/aider",
        args: args(&[
            "--message",
            PROMPT,
            "--yes-always",
            "--model",
            "gpt-4o-mini",
            // The throwaway project is no git repo, and nothing of it needs committing.
            "--no-git",
            // No PyPI version check, no analytics, no release notes.
            "--no-check-update",
            "--analytics-disable",
            "--no-show-release-notes",
            "--no-pretty",
            // The plain (not streamed) Chat Completions answer; llm covers the streamed one.
            "--no-stream",
        ]),
        env: vec![
            // litellm fetches its model price list from GitHub at import without this.
            ("LITELLM_LOCAL_MODEL_COST_MAP", "True".into()),
        ],
        files: vec![],
        must_not_print: vec![],
        trace: true,
    });
}

/// The bypass check finds what it looks for in real strace output: `getent hosts` resolves
/// with glibc's own DNS client (no shim here), so its queries to port 53 carry the hostname,
/// and only that hostname's.
#[test]
fn the_bypass_check_sees_a_dns_query() {
    let Some(strace) = broker_integration::which("strace") else {
        panic!("strace is needed to check that no request went around the broker");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("trace");
    Command::new(strace)
        .args(["-f", "-qq", "-xx", "-s", "256", "-o"])
        .arg(&trace)
        .args(["-e", "trace=connect,sendto,sendmsg,sendmmsg,write,writev"])
        .args(["getent", "hosts", "api.anthropic.com"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("strace");
    let trace = std::fs::read(&trace).expect("trace");
    let found = bypasses(&trace, "api.anthropic.com");
    assert!(
        found.iter().any(|l| l.contains("send")),
        "no DNS query found: {found:#?}"
    );
    assert!(
        bypasses(&trace, "api.openai.com").is_empty(),
        "a query for another host matched"
    );
    // The same queries steered to a responder on another port (as the shim would steer them
    // to the broker) are not a bypass.
    let steered = String::from_utf8_lossy(&trace).replace("htons(53)", "htons(40053)");
    assert!(
        bypasses(steered.as_bytes(), "api.anthropic.com").is_empty(),
        "a query to a port other than 53 matched"
    );
}
