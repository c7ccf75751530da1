//! `broker run [--allow P,..] [--profile NAME] -- CMD ARGS...`: run an agent with the broker
//! embedded in this process. The agent gets placeholders and `libbroker.so`; `broker run`
//! forwards signals to it, returns its exit status (128+N for signal N) and removes the run's
//! files when it ends.

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};
use clap::Args;
use zeroize::Zeroizing;

use super::UpstreamArgs;
use crate::control;
use crate::home::{ensure_private_dir, Home};
use crate::instance::{self, Instance, InstanceSettings, RunSpec};
use crate::launch;
use crate::providers::Catalog;
use crate::proxy::{AgentPid, RunKeys};
use broker_contract::ShimConfig;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Only these providers (comma-separated); default: every provider. PROVIDER:METHOD:/path
    /// (`openai:POST:/v1/responses`) also limits that provider to the methods and paths so
    /// listed; `/path?name=value|other&limit=*` to these query parameters (`/path?`: none);
    /// a `:approve=each` or `:approve=once-per-run` suffix holds what the rule allows for
    /// `broker approve` (see README, "Policy").
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "PROVIDER[:METHOD:/path[?QUERY][:approve=each|once-per-run]]"
    )]
    pub allow: Vec<String>,
    /// A policy file for this run, on top of $BROKER_HOME/policy.toml (it can only narrow it).
    #[arg(long, value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// `audit`: refuse nothing the policy would refuse, and audit it as policy_would_deny
    /// (to write rules from a real session); `enforce` (the default, or the files' `mode`).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub policy_mode: Option<crate::policy::Mode>,
    /// Use this profile's credentials (default: "default").
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Refuse the agent's connections to anything but its providers and loopback.
    #[arg(long)]
    pub deny_unlisted: bool,
    /// Always start a broker in this process, even when `broker serve` is running.
    #[arg(long)]
    pub embedded: bool,
    /// Run the agent without the sandbox: it can then read $BROKER_HOME (the vault, and the
    /// master key when it is in the key file) and the broker's runtime files.
    #[arg(long)]
    pub no_sandbox: bool,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// The agent's command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if std::env::var_os(broker_contract::ENV_SHIM_CONFIG).is_some() {
        if let Some(why) = crate::hardening::inside_run() {
            return run_in_enclosing_run(&args, &why);
        }
    }
    let home = Home::from_env()?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let catalog = Catalog::load(&home)?;
    let (providers, policy) = run_policy(&args, &catalog, &home)?;
    let allow = (!providers.is_empty()).then_some(providers);
    let allowed = |name: &str| allow.as_ref().is_none_or(|a| a.iter().any(|p| p == name));

    // A real key in our own environment (a shell that sourced a .env) must not reach the
    // agent: for an allowed provider it becomes this run's credential, otherwise it is dropped.
    let mut run_keys = HashMap::new();
    let mut drop_vars = Vec::new();
    let mut real_key_vars = Vec::new();
    for provider in catalog.providers() {
        if provider.aws_sigv4.is_some() {
            if let Some(vars) = take_aws_env(provider, allowed(&provider.name), &mut run_keys) {
                real_key_vars.extend(vars);
            }
            continue;
        }
        for var in provider.key_vars() {
            let Ok(value) = std::env::var(var) else {
                continue;
            };
            if value == provider.placeholder || !provider.key_matches(&value) {
                continue;
            }
            let name = &provider.name;
            real_key_vars.push(var.clone());
            if allowed(name) {
                eprintln!("broker: {var} held a real {name} key: this run uses it through the broker and the agent gets a placeholder (store it with 'broker add {name}')");
                run_keys
                    .entry(name.clone())
                    .or_insert_with(|| Zeroizing::new(value));
            } else {
                eprintln!("broker: {var} held a real {name} key and {name} is not in --allow: removed from the agent's environment");
                drop_vars.push(var.clone());
            }
        }
    }

    // Those keys now live in `run_keys` (or nowhere): out of our environment block too, where
    // `/proc/<pid>/environ` and any later exec would show them.
    crate::hardening::forget_env(&real_key_vars.iter().map(String::as_str).collect::<Vec<_>>());

    let program = args.command[0].clone();
    let target = launch::inspect_target(std::path::Path::new(&program));
    let shim = launch::find_shim();
    let command_line = args
        .command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");

    let runtime = super::runtime()?;
    let spec = RunSpec {
        id: String::new(),
        allow: allow.clone(),
        profiles: HashMap::new(),
        default_profile: args.profile.clone(),
        deny_unlisted: args.deny_unlisted,
        pid: AgentPid::new(Some(std::process::id())),
        command: command_line,
        run_keys: RunKeys(run_keys),
        policy,
        owner: None,
    };
    let agent_pid = spec.pid.clone();
    let upstream_overrides = !args.upstream.is_empty();
    let upstream = args.upstream.into_settings(Some(&home))?;
    let mut broker = if args.embedded || upstream_overrides {
        start_embedded(&runtime, &home, upstream, spec)?
    } else {
        match control::join(&home, &spec.to_request())? {
            Some(joined) => RunBroker::Joined(joined),
            None => start_embedded(&runtime, &home, upstream, spec)?,
        }
    };
    let shim_config_path = broker.shim_config_path();
    let shim_config = ShimConfig::parse(&std::fs::read_to_string(&shim_config_path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", shim_config_path.display()))?;

    let mut command = Command::new(&program);
    command.args(&args.command[1..]);
    for var in &drop_vars {
        command.env_remove(var);
    }
    launch::scrub_broker_secrets(&mut command);
    command.env_remove(crate::hardening::ENV_ORIGINAL_PRELOAD);
    for (var, placeholder) in &shim_config.env {
        command.env(var, placeholder);
    }
    // Set only where the user had set them (a real key there was taken above).
    for (var, placeholder) in &shim_config.env_if_set {
        if std::env::var_os(var).is_some() || real_key_vars.contains(var) {
            command.env(var, placeholder);
        }
    }
    if let Some(why) = launch::attach(
        &mut command,
        &target,
        shim.as_deref(),
        &shim_config,
        &shim_config_path,
    )? {
        eprintln!("broker: {why}");
    }

    let spawned = if args.no_sandbox {
        eprintln!(
            "broker: --no-sandbox: the agent can read $BROKER_HOME and the broker's runtime files"
        );
        command.spawn().map(|child| (child.id(), child))
    } else {
        let run_dir = shim_config_path
            .parent()
            .unwrap_or(std::path::Path::new("/"));
        let keyring = crate::vault::KeyConfig::from_env()
            .ok()
            .and_then(|k| k.source)
            .or_else(|| crate::vault::recorded_key_source(&home))
            == Some(crate::vault::KeySource::Keyring);
        let plan = crate::sandbox::Plan::for_run(&home, run_dir, keyring, shim.as_deref());
        let status_dir = crate::home::runtime_base().unwrap_or_else(|| home.daemon_dir());
        ensure_private_dir(&status_dir)?;
        crate::sandbox::spawn(&mut command, &plan, &status_dir)?
            .map(|started| (started.agent_pid, started.child))
    };
    let (pid, mut child) = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            // The shells' convention: 127 not found, 126 found but not executable.
            eprintln!("broker: cannot start {}: {err}", program.to_string_lossy());
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Ok(ExitCode::from(code));
        }
    };
    agent_pid.set(pid);
    if let RunBroker::Joined(joined) = &mut broker {
        joined.agent_started(pid);
    }
    let forwarder = runtime.spawn(forward_signals(child.id()));
    let status =
        runtime.block_on(async { tokio::task::spawn_blocking(move || child.wait()).await })??;
    forwarder.abort();
    drop(broker);
    drop(runtime);
    Ok(exit_code(status))
}

fn parse_mode(text: &str) -> Result<crate::policy::Mode, String> {
    crate::policy::Mode::parse(text)
}

/// The providers `--allow` names (each once) and the run's own policy layers, checked here so a
/// mistake is told before anything starts (the broker serving the run checks them again, with
/// `$BROKER_HOME/policy.toml` under them).
fn run_policy(
    args: &RunArgs,
    catalog: &Catalog,
    home: &Home,
) -> anyhow::Result<(Vec<String>, crate::policy::RunPolicySpec)> {
    let mut providers: Vec<String> = Vec::new();
    let mut spec = crate::policy::RunPolicySpec {
        mode: args.policy_mode,
        ..Default::default()
    };
    for entry in &args.allow {
        let name = match entry.split_once(':') {
            Some((name, _)) => {
                spec.allow_rules.push(entry.clone());
                name
            }
            None => entry.as_str(),
        };
        if catalog.get(name).is_none() {
            bail!("--allow {entry}: unknown provider '{name}' (see 'broker providers')");
        }
        if !providers.iter().any(|p| p == name) {
            providers.push(name.to_string());
        }
    }
    for path in &args.policy {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--policy {}: cannot read it", path.display()))?;
        spec.files.push((path.display().to_string(), text));
    }
    spec.layers(catalog)?;
    crate::policy::load_file(&home.root().join(crate::policy::HOME_POLICY_FILE), catalog)?;
    Ok((providers, spec))
}

/// The broker serving this run: a running `broker serve` it joined, or its own.
enum RunBroker {
    Joined(control::JoinedRun),
    Embedded {
        // Boxed: an instance is a few hundred bytes, a joined run a few dozen.
        instance: Box<Instance>,
        _dir: tempfile::TempDir,
    },
}

impl RunBroker {
    fn shim_config_path(&self) -> PathBuf {
        match self {
            RunBroker::Joined(joined) => joined.shim_config.clone(),
            RunBroker::Embedded { instance, .. } => instance.shim_config_path.clone(),
        }
    }
}

/// Start a broker in this process, with its files in a private temporary directory (under
/// `$XDG_RUNTIME_DIR/broker` when there is one, else `$BROKER_HOME/run`).
fn start_embedded(
    runtime: &tokio::runtime::Runtime,
    home: &Home,
    upstream: crate::proxy::UpstreamSettings,
    mut spec: RunSpec,
) -> anyhow::Result<RunBroker> {
    let base = crate::home::runtime_base().unwrap_or_else(|| home.daemon_dir());
    ensure_private_dir(&base)?;
    let dir = tempfile::Builder::new().prefix("run-").tempdir_in(&base)?;
    spec.id = dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let instance = runtime.block_on(instance::start(InstanceSettings {
        home: home.clone(),
        upstream,
        label: spec.id.clone(),
        limits: crate::proxy::Limits::default(),
        keys: crate::vault::KeyConfig::from_env()?,
        runtime_dir: dir.path().to_path_buf(),
        run: spec,
        system: None,
    }))?;
    Ok(RunBroker::Embedded {
        instance: Box::new(instance),
        _dir: dir,
    })
}

/// Forward the signals a supervisor may send to the agent. SIGINT and SIGQUIT from a terminal
/// reach the whole foreground process group, the agent included, so they are forwarded only
/// when stdin is not a terminal (someone sent them to `broker run` alone).
pub(crate) async fn forward_signals(pid: u32) {
    use std::io::IsTerminal as _;
    use tokio::signal::unix::{signal, SignalKind};
    let interactive = std::io::stdin().is_terminal();
    let mut kinds = vec![
        (SignalKind::terminate(), rustix::process::Signal::TERM),
        (SignalKind::hangup(), rustix::process::Signal::HUP),
        (SignalKind::user_defined1(), rustix::process::Signal::USR1),
        (SignalKind::user_defined2(), rustix::process::Signal::USR2),
        (SignalKind::window_change(), rustix::process::Signal::WINCH),
    ];
    // Catch SIGINT/SIGQUIT either way, so they do not kill the broker before the agent.
    let mut terminal_kinds = vec![
        (SignalKind::interrupt(), rustix::process::Signal::INT),
        (SignalKind::quit(), rustix::process::Signal::QUIT),
    ];
    if !interactive {
        kinds.append(&mut terminal_kinds);
    }
    let Some(target) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (kind, sig) in kinds {
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        tasks.spawn(async move {
            while stream.recv().await.is_some() {
                let _ = rustix::process::kill_process(target, sig);
            }
        });
    }
    for (kind, _) in terminal_kinds {
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        tasks.spawn(async move { while stream.recv().await.is_some() {} });
    }
    while tasks.join_next().await.is_some() {}
}

/// `broker run` started inside a run (the agent, or a program it started, runs `broker run`):
/// A real AWS credential in our environment (`AWS_ACCESS_KEY_ID` with an `AKIA`/`ASIA` id and
/// `AWS_SECRET_ACCESS_KEY`, maybe `AWS_SESSION_TOKEN`): for an allowed provider it becomes
/// the run's credential, as one value. Returns the variables that held real values (the agent
/// gets placeholders there), or `None` when there is no real credential.
fn take_aws_env(
    provider: &crate::providers::Provider,
    allowed: bool,
    run_keys: &mut HashMap<String, Zeroizing<String>>,
) -> Option<Vec<String>> {
    let config = provider.aws_sigv4.as_ref()?;
    let id_var = provider.env.first()?;
    let id = std::env::var(id_var).ok()?;
    if id == provider.placeholder || !provider.key_matches(&id) {
        return None;
    }
    let secret = Zeroizing::new(std::env::var(&config.secret_env).unwrap_or_default());
    let token = std::env::var(&config.session_token_env)
        .ok()
        .map(Zeroizing::new);
    let mut vars = vec![id_var.clone(), config.secret_env.clone()];
    if token.is_some() {
        vars.push(config.session_token_env.clone());
    }
    let name = &provider.name;
    if !allowed {
        eprintln!("broker: {id_var} held a real {name} credential and {name} is not in --allow: removed from the agent's environment");
        return Some(vars);
    }
    match crate::proxy::sigv4::credential::AwsCredential::new(&id, &secret, token.as_deref().map(String::as_str)) {
        Ok(credential) => {
            eprintln!("broker: {id_var} and {} held a real {name} credential: this run uses it through the broker and the agent gets placeholders (store it with 'broker add {name}')", config.secret_env);
            run_keys.entry(name.clone()).or_insert_with(|| credential.encode());
        }
        Err(e) => eprintln!("broker: {id_var} held a real {name} access key id, but the credential is not usable ({e}): the agent gets placeholders; store it with 'broker add {name}'"),
    }
    Some(vars)
}

/// the command joins the enclosing run, whose shim and placeholders it inherits, under that
/// run's policy. A nested run of its own could not reach the vault in a sandbox anyway, and
/// outside one it must not get to choose its own upstream settings.
fn run_in_enclosing_run(args: &RunArgs, why: &str) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt as _;
    // Overrides are refused, not silently dropped (this says why).
    args.upstream.clone().into_settings(None)?;
    eprintln!(
        "broker: already inside a broker run ({why}): {} runs in that run, under its policy",
        args.command[0].to_string_lossy()
    );
    let mut command = Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    if let Some(preload) = crate::hardening::original_preload() {
        command.env("LD_PRELOAD", preload);
    }
    command.env_remove(crate::hardening::ENV_ORIGINAL_PRELOAD);
    let err = command.exec();
    eprintln!(
        "broker: cannot start {}: {err}",
        args.command[0].to_string_lossy()
    );
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
    ))
}

/// The agent's status as ours: its code, or 128+N when signal N ended it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_command_is_a_usage_error() {
        use clap::Parser as _;
        assert!(crate::cli::Cli::try_parse_from(["broker", "run"]).is_err());
        assert!(crate::cli::Cli::try_parse_from(["broker", "run", "--", "true"]).is_ok());
    }
}
