//! The command line: raw arguments (clap, validation only) and dispatch to one module per
//! command group. Each module turns its arguments into settings and calls the library.
//!
//! Exit codes (documented in `broker --help` and the README):
//! 0 success; 1 error; 2 usage error (clap); for `broker run`, the command's own status
//! (128+N when it was killed by signal N).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod approve;
pub mod audit;
pub mod aws;
pub mod ca;
pub mod credentials;
pub mod demo;
pub mod doctor;
pub mod import;
pub mod login;
pub mod login_system;
pub mod policy;
pub mod providers;
pub mod rekey;
pub mod run;
pub mod serve;
pub mod shim;
pub mod system;

/// Keeps API keys out of AI agents: the agent holds placeholders, the broker swaps in the
/// real credential on requests to that credential's own hosts.
#[derive(Debug, Parser)]
#[command(name = "broker", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 success, 1 error, 2 usage error; \
`broker run` returns the command's status (128+N if killed by signal N).\n\
All state lives in $BROKER_HOME (default ~/.local/share/broker).";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a credential for a provider (the secret is read from stdin or a no-echo prompt).
    Add(credentials::AddArgs),
    /// List stored credentials (never their values).
    List(credentials::ListArgs),
    /// Show one stored credential, masked.
    Show(credentials::ShowArgs),
    /// Remove a stored credential.
    Remove(credentials::RemoveArgs),
    /// Move literal keys from .env files, the shell's environment or MCP client configs into
    /// the vault, leaving placeholders (a dry run unless --apply).
    Import(import::ImportArgs),
    /// Move the vault's master key to another source, or replace it (a new passphrase, a new
    /// key file).
    Rekey(rekey::RekeyArgs),
    /// Log in to a provider with OAuth (browser with PKCE, or --device); tokens go to the vault.
    Login(login::LoginArgs),
    /// Revoke a provider's OAuth tokens (where it can) and remove them from the vault.
    Logout(login::LogoutArgs),
    /// List the requests waiting for approval (a policy rule with `approve`), or answer one.
    Approve(approve::ApproveArgs),
    /// Check a policy file, or suggest one from what a run did (`suggest`).
    Policy(policy::PolicyArgs),
    /// Show the audit log (`--json`, `--since`, `--follow`), or `verify` its hash chain.
    Audit(audit::AuditArgs),
    /// List the providers broker knows, or show one.
    Providers(providers::ProvidersArgs),
    /// Run an agent with placeholders and libbroker.so, the broker embedded in this process.
    Run(run::RunArgs),
    /// Run the broker as a long-lived daemon for this user (or, with --system, for the uids
    /// of /etc/broker/config.toml, as its own user).
    Serve(serve::ServeArgs),
    /// Set up the system broker: `broker system install` (as root), `broker system unit`.
    System(system::SystemArgs),
    /// Check the vault, audit log, providers, CA and shim, and self-test each client runtime.
    Doctor(doctor::DoctorArgs),
    /// The CA of the running `broker serve`.
    Ca(ca::CaArgs),
    /// Print the path of the libbroker.so that `broker run` preloads (or --install it to a
    /// file), for a bare LD_PRELOAD and the system broker's users.
    Shim(shim::ShimArgs),
    /// Show the whole flow offline: a local origin, a stored key, a real client, the swap.
    Demo(demo::DemoArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The sandbox's first stage (started by `broker run`, not by people).
    #[command(name = "__sandbox", hide = true)]
    Sandbox(crate::sandbox::StageArgs),
    /// The sandbox's init, PID 1 inside it (started by the first stage).
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit(crate::sandbox::StageArgs),
}

/// Entry point of the `broker` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The sandbox's stages hold no secret and must stay dumpable (a non-dumpable process
    // cannot write its own user-namespace maps); everything else protects itself first.
    let cli = match cli.command {
        Command::Sandbox(args) => return crate::sandbox::setup_stage(args),
        Command::SandboxInit(args) => return crate::sandbox::init_stage(args),
        command => {
            crate::hardening::protect_process();
            Cli { command }
        }
    };
    // The demo's own output tells the story; its (expected) warnings would only distract.
    init_logging(
        if matches!(cli.command, Command::Demo(_) | Command::Doctor(_)) {
            "error"
        } else {
            "warn,broker=info"
        },
    );
    let result = match cli.command {
        Command::Add(args) => credentials::add(args),
        Command::List(args) => credentials::list(args),
        Command::Show(args) => credentials::show(args),
        Command::Remove(args) => credentials::remove(args),
        Command::Import(args) => import::run(args),
        Command::Rekey(args) => rekey::run(args),
        Command::Login(args) => login::login(args),
        Command::Logout(args) => login::logout(args),
        Command::Audit(args) => audit::run(args),
        Command::Approve(args) => approve::run(args),
        Command::Policy(args) => policy::run(args),
        Command::Providers(args) => providers::run(args),
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::run(args),
        Command::System(args) => system::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Ca(args) => ca::run(args),
        Command::Shim(args) => shim::run(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "broker", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox(_) | Command::SandboxInit(_) => unreachable!("dispatched above"),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("broker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Upstream overrides, shared by every command that starts a broker: for tests, and for a
/// network whose TLS is intercepted by a proxy with its own CA. Refused in a process started
/// inside a run (see `hardening::inside_run`): an agent could otherwise start a broker of its
/// own that sends a key to a server it runs.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpstreamArgs {
    /// Also trust this CA for upstream TLS (logged when on; refused inside a run).
    #[arg(long, env = "BROKER_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<std::path::PathBuf>,
    /// Reach HOST:PORT at ADDR (or ADDR:PORT) instead of resolving it (logged when on;
    /// refused inside a run).
    #[arg(
        long,
        env = "BROKER_RESOLVE",
        value_delimiter = ',',
        value_name = "HOST:PORT:ADDR"
    )]
    pub resolve: Vec<crate::proxy::ResolveOverride>,
    /// Forward the agent's DNS queries for unmanaged names to ADDR:PORT instead of the
    /// nameservers of /etc/resolv.conf (logged when on; refused inside a run).
    #[arg(
        long,
        env = "BROKER_DNS_UPSTREAM",
        value_delimiter = ',',
        value_name = "ADDR:PORT"
    )]
    pub dns_upstream: Vec<std::net::SocketAddr>,
}

impl UpstreamArgs {
    pub fn is_empty(&self) -> bool {
        self.upstream_ca.is_none() && self.resolve.is_empty() && self.dns_upstream.is_empty()
    }

    /// The settings, or an error when overrides were given to a process started inside a run.
    /// `home`: the broker's home, whose `config.toml` may name an upstream proxy (`None` for
    /// the system broker, which takes one from its environment only; see `upstream_proxy`).
    pub fn into_settings(
        self,
        home: Option<&crate::home::Home>,
    ) -> anyhow::Result<crate::proxy::UpstreamSettings> {
        if !self.is_empty() {
            if let Some(why) = crate::hardening::inside_run() {
                anyhow::bail!(
                    "--upstream-ca, --resolve and --dns-upstream (BROKER_UPSTREAM_CA, BROKER_RESOLVE, BROKER_DNS_UPSTREAM) are not taken from a process started inside a broker run ({why}): a program the agent starts could point a credential at a server of its own. Give them to a broker started outside any run."
                );
            }
        }
        Ok(crate::proxy::UpstreamSettings {
            extra_ca: self.upstream_ca,
            resolve: self.resolve,
            dns: self.dns_upstream,
            proxy: crate::proxy::UpstreamProxy::configured(home)?.map(|proxy| {
                tracing::info!(%proxy, "upstreams are reached through this proxy");
                std::sync::Arc::new(proxy)
            }),
        })
    }
}

/// The proxy's timeouts, shortened for tests (hidden: the defaults in `proxy::limits` say why
/// they are what they are).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitArgs {
    /// Seconds from TLS (or the last HTTP/1.1 response) to a complete request head.
    #[arg(long, hide = true, value_name = "SECONDS")]
    pub request_head_timeout: Option<f64>,
    /// Seconds an HTTP/2 connection with no open stream is kept.
    #[arg(long, hide = true, value_name = "SECONDS")]
    pub idle_timeout: Option<f64>,
}

impl LimitArgs {
    pub fn into_limits(self) -> crate::proxy::Limits {
        let seconds = |s: f64| std::time::Duration::from_secs_f64(s.clamp(0.001, 86_400.0));
        let mut limits = crate::proxy::Limits::default();
        if let Some(s) = self.request_head_timeout {
            limits.request_head_timeout = seconds(s);
        }
        if let Some(s) = self.idle_timeout {
            limits.idle_timeout = seconds(s);
        }
        limits
    }
}

/// The async runtime of commands that serve: two workers fit the 2-core machines agents
/// share, and more only add context switches for a proxy that is mostly waiting.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .enable_all()
        .build()?)
}

/// The runtime of `broker serve`. On one or two cores, a single thread: the agent and the
/// origin's answers compete for those cores anyway, and worker threads waking each other (and
/// parking and unparking) cost a context switch or two per request. Measured on a 2-core VM
/// with `scripts/bench`, keep-alive: the broker's CPU per request fell 10-25 % at 1 and at 8
/// connections with the same or higher throughput. Only for `serve`, which runs everything
/// inside one `block_on`: commands that run synchronous code between `block_on` calls while
/// their proxy serves (`doctor`'s self-test) need worker threads.
pub(crate) fn serve_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    if std::thread::available_parallelism().map_or(2, |n| n.get()) <= 2 {
        return Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?);
    }
    runtime()
}

/// Resolve on SIGINT or SIGTERM.
pub(crate) async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Logs go to stderr; `BROKER_LOG` sets the filter (default `info` for broker, `warn` else).
fn init_logging(default_filter: &str) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("BROKER_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
