//! An offline, end-to-end check of the whole flow, used by `broker demo` and `broker doctor`:
//! a local TLS origin playing the providers' API hosts (`api.openai.com`, `api.anthropic.com`,
//! `generativelanguage.googleapis.com`) that accepts only made-up keys, a throwaway vault
//! holding those keys, a broker instance pointed at the origin, and real programs run as the
//! agent under `libbroker.so` with the placeholders: clients (curl, python3, node, git, wget)
//! and the agent CLIs found on `PATH` (claude, codex, gemini, opencode, aider, llm), each
//! making one model call that the origin's fake provider answers ([`fake_llm`]).

pub mod agents;
pub mod fake_llm;
mod origin;
mod ws;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::home::Home;
use crate::instance::{self, Instance, InstanceSettings, RunSpec};
use crate::launch;
use crate::proxy::{ResolveOverride, UpstreamSettings};
use crate::vault::{CredentialKind, KeyConfig, KeySource, Vault};
use agents::AGENTS;
use fake_llm::Provider;
pub use origin::{Origin, Seen, GIT_URL};

/// The host the clients' probes call.
pub const HOST: &str = "api.openai.com";
const URL: &str = "https://api.openai.com/v1/models";
/// A client that hangs is a failed check, not a hung command.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// An agent CLI starts a Node or Python runtime and loads a lot of code before its one
/// model call: a minute, and it is a failed check.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A running self-test: origin, vault and broker, in a throwaway home under `scratch`.
pub struct SelfTest {
    pub origin: Origin,
    pub instance: Instance,
    pub home: Home,
    /// The made-up OpenAI key the origin accepts.
    pub key: String,
    /// What the agent holds in `OPENAI_API_KEY`.
    pub placeholder: String,
    /// The made-up key of every provider the origin plays.
    keys: origin::Keys,
    /// Where each probe gets a directory of its own (a throwaway HOME, its output).
    scratch: PathBuf,
}

impl SelfTest {
    pub async fn start(scratch: &Path, label: &str) -> anyhow::Result<SelfTest> {
        let home = Home::at(scratch.join("home"));
        home.ensure()?;
        let keys = KeyConfig {
            source: Some(KeySource::File),
            passphrase: None,
            system_key_file: None,
        };
        let made_up: Vec<(Provider, String)> = Provider::ALL
            .into_iter()
            .map(|p| Ok((p, made_up_key(p)?)))
            .collect::<anyhow::Result<_>>()?;
        let made_up = Arc::new(made_up);
        let origin = Origin::start(scratch, made_up.clone()).await?;
        let vault = Vault::open_with(&home, &keys)?;
        for (provider, key) in made_up.iter() {
            vault.put(provider.name(), "default", key, CredentialKind::ApiKey)?;
        }
        drop(vault);
        let instance = instance::start(InstanceSettings {
            home: home.clone(),
            upstream: UpstreamSettings {
                extra_ca: Some(origin.ca_file.clone()),
                resolve: Provider::ALL
                    .iter()
                    .map(|p| ResolveOverride {
                        host: p.host().into(),
                        port: 443,
                        addr: origin.addr,
                    })
                    .collect(),
                dns: Vec::new(),
                proxy: None,
            },
            label: label.into(),
            limits: crate::proxy::Limits::default(),
            keys,
            runtime_dir: home.daemon_dir(),
            run: RunSpec {
                id: label.into(),
                command: format!("broker {label}"),
                ..RunSpec::default()
            },
            system: None,
        })
        .await?;
        let placeholder = instance
            .shim
            .env
            .iter()
            .find(|(var, _)| var == "OPENAI_API_KEY")
            .map(|(_, p)| p.clone())
            .context("the catalog has no OPENAI_API_KEY placeholder")?;
        let key = made_up
            .iter()
            .find(|(p, _)| *p == Provider::OpenAi)
            .map(|(_, k)| k.clone())
            .context("no OpenAI key")?;
        Ok(SelfTest {
            origin,
            instance,
            home,
            key,
            placeholder,
            keys: made_up,
            scratch: scratch.to_path_buf(),
        })
    }

    /// The probes this machine can run: each installed client, under the shim when it is
    /// found, else (curl only) pointed at the broker explicitly.
    pub fn probes(&self) -> Vec<Probe> {
        let shim = launch::find_shim();
        let bearer = format!("Authorization: Bearer {}", self.placeholder);
        let mut probes = Vec::new();
        if let Some(curl) = launch::which("curl") {
            let mut c = Command::new(curl);
            if shim.is_some() {
                c.args(["-sS", "--fail-with-body", URL, "-H", &bearer]);
                probes.push(self.probe("curl", c, "curl -sS https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"", &shim));
            } else {
                let shim_cfg = &self.instance.shim;
                let target = format!(
                    "{HOST}:443:{}:{}",
                    broker_contract::run_ipv4(shim_cfg.slot),
                    shim_cfg.port
                );
                c.args([
                    "-sS",
                    "--fail-with-body",
                    "--connect-to",
                    &target,
                    "--cacert",
                ])
                .arg(&shim_cfg.ca_file)
                .args([URL, "-H", &bearer]);
                probes.push(self.probe("curl", c, &format!("curl -sS --connect-to {target} --cacert ca.pem {URL} -H \"Authorization: Bearer $OPENAI_API_KEY\""), &None));
            }
        }
        if shim.is_none() {
            return probes;
        }
        if let Some(python) = launch::which("python3") {
            let mut c = Command::new(python);
            c.arg("-c").arg(format!(
                "import os,urllib.request as u\nr=u.Request('{URL}',headers={{'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']}})\nprint(u.urlopen(r).read().decode())"
            ));
            probes.push(self.probe(
                "python3",
                c,
                "python3 -c 'urllib.request.urlopen(...)'",
                &shim,
            ));
        }
        if let Some(node) = launch::which("node") {
            let mut c = Command::new(node);
            c.arg("-e").arg(format!(
                "fetch('{URL}',{{headers:{{authorization:'Bearer '+process.env.OPENAI_API_KEY}}}}).then(async r=>{{console.log(await r.text());process.exit(r.ok?0:1)}}).catch(e=>{{console.error(String(e));process.exit(2)}})"
            ));
            probes.push(self.probe("node", c, "node -e 'fetch(...)'", &shim));
        }
        if let Some(git) = launch::which("git") {
            // git over HTTPS as it talks to a forge: the placeholder in an extra header, and
            // the origin's `info/refs` answered in git's dumb-HTTP form (a ref list).
            let mut c = Command::new(git);
            c.args([
                "-c",
                &format!("http.extraHeader={bearer}"),
                "ls-remote",
                GIT_URL,
            ])
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
            probes.push(self.probe(
                "git",
                c,
                &format!("git -c http.extraHeader=\"Authorization: Bearer $OPENAI_API_KEY\" ls-remote {GIT_URL}"),
                &shim,
            ));
        }
        if let Some(wget) = launch::which("wget") {
            let mut c = Command::new(wget);
            c.args(["-q", "-O", "-", "--header", &bearer, URL]);
            probes.push(self.probe(
                "wget",
                c,
                "wget -q -O - --header \"Authorization: Bearer $OPENAI_API_KEY\" ...",
                &shim,
            ));
        }
        if let Some(lib) = &shim {
            for agent in AGENTS {
                if let Some(program) = launch::which(agent.name) {
                    probes.push(self.agent_probe(agent, &program, lib));
                }
            }
        }
        probes
    }

    fn probe(
        &self,
        name: &'static str,
        mut command: Command,
        shown: &str,
        shim: &Option<PathBuf>,
    ) -> Probe {
        command.env("OPENAI_API_KEY", &self.placeholder);
        launch::scrub_broker_secrets(&mut command);
        if let Some(lib) = shim {
            launch::preload(&mut command, lib, &self.instance.shim_config_path);
        }
        Probe {
            name,
            command: Ok(command),
            shown: shown.to_string(),
            transparent: shim.is_some(),
            agent: None,
        }
    }

    /// Run one probe (blocking) and check both halves of the promise.
    pub fn check(&self, probe: Probe) -> ProbeResult {
        let before = self.origin.received().len();
        let (timeout, out_dir) = match probe.agent {
            Some(_) => (AGENT_TIMEOUT, self.scratch.join("agents").join(probe.name)),
            None => (PROBE_TIMEOUT, self.scratch.join("probes").join(probe.name)),
        };
        let output = probe
            .command
            .map_err(anyhow::Error::msg)
            .and_then(|c| run_bounded(c, &out_dir, timeout));
        let received: Vec<Seen> = self.origin.received().into_iter().skip(before).collect();
        let origin_auth = received.first().and_then(|s| s.authorization.clone());
        let Ok(out) = output else {
            let err = output.err().map(|e| format!("{e:#}")).unwrap_or_default();
            return ProbeResult {
                name: probe.name,
                ok: false,
                detail: err,
                origin_auth,
                stdout: String::new(),
                took: None,
            };
        };
        let leaked = self
            .keys
            .iter()
            .any(|(_, key)| out.stdout.contains(key.as_str()) || out.stderr.contains(key.as_str()));
        let (ok, detail) = match probe.agent {
            None => {
                let swapped =
                    origin_auth.as_deref() == Some(format!("Bearer {}", self.key).as_str());
                let detail = if leaked {
                    "the agent saw the real key".to_string()
                } else if received.is_empty() {
                    format!(
                        "nothing reached the origin: {}",
                        first_line(&out.stderr, &out.stdout)
                    )
                } else if !swapped {
                    "the origin did not get the real key".to_string()
                } else if !out.success {
                    format!(
                        "the client failed: {}",
                        first_line(&out.stderr, &out.stdout)
                    )
                } else if probe.transparent {
                    "swap verified through libbroker.so".to_string()
                } else {
                    "swap verified (client pointed at the broker; libbroker.so not found)"
                        .to_string()
                };
                (swapped && !leaked && out.success, detail)
            }
            Some((provider, ref via)) => {
                agents::verdict(provider, via.is_some(), &received, &out, leaked)
            }
        };
        ProbeResult {
            name: probe.name,
            ok,
            detail,
            origin_auth,
            stdout: out.stdout,
            took: Some(out.took),
        }
    }
}

/// One program to run as the agent.
pub struct Probe {
    pub name: &'static str,
    /// The command, or why it could not be prepared.
    command: Result<Command, String>,
    /// How the command reads to a person (with `$OPENAI_API_KEY` unexpanded).
    pub shown: String,
    /// Under libbroker.so (true) or pointed at the broker explicitly.
    pub transparent: bool,
    /// For an agent CLI: its provider, and the note when it went through the CONNECT
    /// listener.
    agent: Option<(Provider, Option<String>)>,
}

pub struct ProbeResult {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// The `Authorization` the origin received first, if anything arrived.
    pub origin_auth: Option<String>,
    pub stdout: String,
    /// How long the program ran.
    pub took: Option<Duration>,
}

pub(crate) fn first_line<'a>(a: &'a str, b: &'a str) -> &'a str {
    a.lines()
        .chain(b.lines())
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
}

/// What a probe's program did.
pub(crate) struct Finished {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Run `command` with its output in files under `dir` (not pipes: a grandchild left behind
/// would hold a pipe open), in a process group of its own that is killed when it is done or
/// out of time (so nothing it started outlives the self-test).
fn run_bounded(mut command: Command, dir: &Path, timeout: Duration) -> anyhow::Result<Finished> {
    use std::os::unix::process::CommandExt as _;
    std::fs::create_dir_all(dir)?;
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .process_group(0)
        .spawn()
        .context("cannot start the client")?;
    let group = rustix::process::Pid::from_raw(child.id() as i32);
    let kill_group = || {
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    };
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            kill_group();
            let _ = child.wait();
            anyhow::bail!("timed out after {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    kill_group();
    Ok(Finished {
        success: status.success(),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        took,
    })
}

/// A random, made-up key in `provider`'s format (its catalog's `key_pattern`).
fn made_up_key(provider: Provider) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(match provider {
        Provider::OpenAi => format!("sk-demo-{}", &hex[..24]),
        Provider::Anthropic => format!("sk-ant-demo-{hex}"),
        Provider::Gemini => format!("AIzaDemo-{hex}"),
    })
}
