//! `broker add | list | show | remove`: the credentials in the vault.
//!
//! Secrets come from stdin (when it is not a terminal) or a no-echo prompt, never from argv:
//! every process of the user can read another's argv in `/proc/PID/cmdline`. No secret is
//! printed back, not even in an error.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use zeroize::Zeroizing;

use crate::audit::{Audit, AuditEvent, EventKind};
use crate::home::Home;
use crate::providers::{Catalog, Provider};
use crate::system::admin::{AdminReply, AdminRequest};
use crate::vault::{CredentialInfo, CredentialKind, PutOutcome, Vault, MAX_SECRET_LEN};

#[derive(Debug, Args)]
#[command(
    after_help = "The secret is read from stdin when stdin is not a terminal \
(`pass show openai | broker add openai`), otherwise from a prompt that does not echo.\n\
Never pass it as an argument: other processes can read a command line.\n\n\
The vault's master key comes from BROKER_PASSPHRASE if set, else the OS keyring, else \
$BROKER_HOME/master.key; BROKER_KEY_SOURCE=passphrase|keyring|file forces one for a new vault."
)]
pub struct AddArgs {
    /// Provider name (see `broker providers`).
    pub provider: String,
    /// Profile name, to keep several credentials for one provider.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Store the secret even if it does not look like a key of this provider.
    #[arg(long)]
    pub force: bool,
    /// Get the key from this command (run with `sh -c` on use; its output is the key), like a
    /// git credential helper: `--from-command 'op read op://Private/OpenAI/key'`.
    #[arg(long, value_name = "COMMAND")]
    pub from_command: Option<String>,
    /// With --from-command: seconds to reuse the command's output before running it again.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "from_command"
    )]
    pub ttl: u64,
    /// The system broker's vault (`broker serve --system`), over its control socket: as root
    /// or an admin uid of /etc/broker/config.toml.
    #[arg(long)]
    pub system: bool,
    /// aws only: a role the broker assumes with this credential (STS AssumeRole), signing
    /// requests with the role's short-lived credentials, fetched again before they expire.
    #[arg(long, value_name = "ARN")]
    pub role_arn: Option<String>,
    /// Catches a secret given on the command line, to refuse it without echoing it.
    #[arg(hide = true, num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
    pub stray: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The system broker's vault (`broker serve --system`), over its control socket: as root
    /// or an admin uid of /etc/broker/config.toml.
    #[arg(long)]
    pub system: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub provider: String,
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Refused: the system broker never shows a credential, not even masked.
    #[arg(long)]
    pub system: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    pub provider: String,
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// The system broker's vault (`broker serve --system`), over its control socket: as root
    /// or an admin uid of /etc/broker/config.toml.
    #[arg(long)]
    pub system: bool,
}

pub fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    if !args.stray.is_empty() {
        // Do not repeat the arguments: they may be the secret.
        bail!(
            "refusing a secret on the command line: other processes can read it (ps, /proc). \
             Pipe it on stdin instead, e.g. `pass show {p} | broker add {p}`, or run \
             `broker add {p}` and paste it at the prompt. If it was a real key, consider it \
             exposed (shell history) and rotate it",
            p = printable_name(&args.provider)
        );
    }
    if args.system {
        return add_to_system(&args);
    }
    let home = home()?;
    let catalog = Catalog::load(&home)?;
    let provider = find_provider(&catalog, &args.provider)?;
    crate::vault::check_name("profile", &args.profile)?;

    if let Some(command) = &args.from_command {
        return add_command(&home, provider, &args, command);
    }
    if provider.auth == crate::providers::AuthKind::AwsSigv4 {
        let secret = super::aws::read_credential(provider, args.role_arn.as_deref())?;
        return store(&home, provider, &args, secret);
    }
    if args.role_arn.is_some() {
        bail!("--role-arn is for the aws provider only");
    }
    let secret = read_secret(provider)?;
    if provider.is_placeholder(&secret) {
        bail!(
            "that is broker's placeholder for {}, not a real key (it is what agents see in {})",
            provider.name,
            provider.env.join(", ")
        );
    }
    if !args.force && !provider.key_matches(&secret) {
        bail!(
            "this does not look like a key for {} (expected the pattern {}); nothing was stored. \
             Check for a copy-paste slip, or pass --force to store it anyway",
            provider.display_name,
            provider.key_pattern
        );
    }

    store(&home, provider, &args, secret)
}

/// Seal `secret` as `provider`'s credential (profile from `args`), accept the provider's
/// hosts for it, and audit the addition.
fn store(
    home: &Home,
    provider: &Provider,
    args: &AddArgs,
    secret: Zeroizing<String>,
) -> anyhow::Result<ExitCode> {
    let vault = Vault::open(home)?;
    let outcome = vault.put(
        &provider.name,
        &args.profile,
        &secret,
        CredentialKind::ApiKey,
    )?;
    drop(secret);
    super::providers::accept_on_store(home, &vault, provider, "broker add")?;
    audit(
        home,
        &vault,
        EventKind::CredentialAdded,
        &provider.name,
        &args.profile,
    );
    let verb = match outcome {
        PutOutcome::Added => "stored",
        PutOutcome::Replaced => "replaced",
    };
    eprintln!(
        "{verb} the {} key (profile {}) in {} (key source: {})",
        provider.display_name,
        args.profile,
        vault.path().display(),
        vault.key_source()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let infos = if args.system {
        match system_request(&AdminRequest::List)? {
            AdminReply::Ok { credentials, .. } => credentials,
            AdminReply::Error { error } => bail!("the system broker refused: {error}"),
        }
    } else {
        let home = home()?;
        if Vault::exists(&home) {
            Vault::open(&home)?.list()?
        } else {
            Vec::new()
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(ExitCode::SUCCESS);
    }
    if infos.is_empty() {
        eprintln!("no credentials stored; add one with `broker add <provider>`");
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16} {:<12} {:<8} {:<20} UPDATED",
        "PROVIDER", "PROFILE", "KIND", "CREATED"
    )?;
    for i in &infos {
        writeln!(
            out,
            "{:<16} {:<12} {:<8} {:<20} {}{}",
            i.provider,
            i.profile,
            i.kind,
            short_time(&i.created_at),
            short_time(&i.updated_at),
            if i.integrity_ok {
                ""
            } else {
                "  INTEGRITY CHECK FAILED"
            }
        )?;
    }
    for i in infos.iter().filter(|i| !i.integrity_ok) {
        let err = crate::vault::VaultError::Integrity {
            provider: i.provider.clone(),
            profile: i.profile.clone(),
        };
        eprintln!("{err}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    if args.system {
        bail!("the system broker never shows a credential, not even masked: `broker list --system` lists what it holds");
    }
    let home = home()?;
    if !Vault::exists(&home) {
        bail!("{}", missing(&args.provider, &args.profile));
    }
    let vault = Vault::open(&home)?;
    let (Some(info), Some(secret)) = (
        vault.info(&args.provider, &args.profile)?,
        vault.get(&args.provider, &args.profile)?,
    ) else {
        bail!("{}", missing(&args.provider, &args.profile));
    };
    let shown = Shown {
        info: &info,
        secret: secret.masked(),
        length: secret.char_len(),
        key_source: vault.key_source().as_str(),
        vault: vault.path().display().to_string(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "provider    {}", info.provider)?;
    writeln!(out, "profile     {}", info.profile)?;
    writeln!(out, "kind        {}", info.kind)?;
    writeln!(out, "secret      {}", shown.secret)?;
    writeln!(out, "created     {}", info.created_at)?;
    writeln!(out, "updated     {}", info.updated_at)?;
    if let Some(expires) = &info.expires_at {
        writeln!(out, "expires     {expires}")?;
    }
    writeln!(out, "key source  {}", vault.key_source())?;
    writeln!(out, "vault       {}", shown.vault)?;
    Ok(ExitCode::SUCCESS)
}

pub fn remove(args: RemoveArgs) -> anyhow::Result<ExitCode> {
    if args.system {
        let request = AdminRequest::Remove {
            provider: args.provider.clone(),
            profile: args.profile.clone(),
        };
        return match system_request(&request)? {
            AdminReply::Ok { message, .. } => {
                eprintln!("{message}");
                Ok(ExitCode::SUCCESS)
            }
            AdminReply::Error { error } => bail!("the system broker refused: {error}"),
        };
    }
    let home = home()?;
    if !Vault::exists(&home) {
        bail!("{}", missing(&args.provider, &args.profile));
    }
    let vault = Vault::open(&home)?;
    if !vault.remove(&args.provider, &args.profile)? {
        bail!("{}", missing(&args.provider, &args.profile));
    }
    audit(
        &home,
        &vault,
        EventKind::CredentialRemoved,
        &args.provider,
        &args.profile,
    );
    eprintln!(
        "removed the {} credential (profile {})",
        args.provider, args.profile
    );
    Ok(ExitCode::SUCCESS)
}

/// `broker add --system`: the secret goes over the system broker's control socket (read
/// from stdin or a no-echo prompt, like any other), and the broker checks it against its own
/// catalog, the one that decides where it goes.
fn add_to_system(args: &AddArgs) -> anyhow::Result<ExitCode> {
    // Refused for good, not for now: the command would run as the broker's user, which holds
    // every uid's keys and reads the vault's master key. An admin uid may replace or remove a
    // key (denial, README), never read one; running a command of its choice as the broker
    // would be reading them all.
    if args.from_command.is_some() {
        bail!("--from-command is refused with --system: the command would run as the system broker's user, which holds every user's keys, so an admin could read them all through it. Store the key itself: `<command> | broker add {} --system`", args.provider);
    }
    crate::vault::check_name("profile", &args.profile)?;
    let secret = read_secret_for(&args.provider)?;
    let request = AdminRequest::Add {
        provider: args.provider.clone(),
        profile: args.profile.clone(),
        secret: secret.to_string(),
        force: args.force,
    };
    drop(secret);
    match system_request(&request)? {
        AdminReply::Ok { message, .. } => {
            eprintln!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        AdminReply::Error { error } => bail!("the system broker refused: {error}"),
    }
}

pub(super) fn system_request(request: &AdminRequest) -> anyhow::Result<AdminReply> {
    let socket = crate::system::client_run_dir().join(broker_contract::DAEMON_CONTROL_SOCKET);
    crate::system::admin::request(&socket, request)
}

/// `broker show --json`: metadata and the masked form only.
#[derive(serde::Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    info: &'a CredentialInfo,
    secret: String,
    length: usize,
    key_source: &'static str,
    vault: String,
}

fn home() -> anyhow::Result<Home> {
    let home = Home::from_env().context("cannot locate BROKER_HOME")?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    Ok(home)
}

fn missing(provider: &str, profile: &str) -> String {
    format!(
        "no credential for {} (profile {}): see `broker list`, or store one with `broker add {}{}`",
        printable_name(provider),
        printable_name(profile),
        printable_name(provider),
        if profile == "default" {
            String::new()
        } else {
            format!(" --profile {}", printable_name(profile))
        }
    )
}

fn find_provider<'a>(catalog: &'a Catalog, name: &str) -> anyhow::Result<&'a Provider> {
    if let Some(p) = catalog.get(name) {
        return Ok(p);
    }
    // A secret typed where the provider name goes must not be echoed either.
    let looks_secret = name.len() > 32 || catalog.providers().iter().any(|p| p.key_matches(name));
    let known: Vec<&str> = catalog
        .providers()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    if looks_secret {
        bail!(
            "unknown provider (name not shown: it looks like it could be a key; if it was one, \
             consider it exposed). Known providers: {}; see `broker providers`",
            known.join(", ")
        );
    }
    bail!(
        "unknown provider {:?}. Known providers: {}; see `broker providers`, or add a custom one \
         in $BROKER_HOME/providers/",
        printable_name(name),
        known.join(", ")
    )
}

/// A name safe to print: as is when it is short plain text, else a placeholder.
pub(super) fn printable_name(name: &str) -> String {
    if name.len() <= 32
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        name.to_string()
    } else {
        "<provider>".to_string()
    }
}

/// The secret from stdin (not a terminal) or a no-echo prompt. One trailing newline is
/// removed; nothing else is changed (the vault refuses other control characters).
/// `broker add --from-command`: check the command works once, then store it (sealed).
fn add_command(
    home: &Home,
    provider: &Provider,
    args: &AddArgs,
    command: &str,
) -> anyhow::Result<ExitCode> {
    let key = crate::credential_command::run(command).map_err(|failure| {
        failure.log(&provider.name, &args.profile);
        anyhow::anyhow!("{}; nothing was stored", failure.message)
    })?;
    if provider.is_placeholder(&key) || (!args.force && !provider.key_matches(&key)) {
        bail!(
            "the command ran, but what it printed does not look like a key for {} (expected the pattern {}); nothing was stored. Pass --force to store it anyway",
            provider.display_name,
            provider.key_pattern
        );
    }
    drop(key);
    let vault = Vault::open(home)?;
    let ttl = std::time::Duration::from_secs(args.ttl);
    vault.put_with_metadata(
        &provider.name,
        &args.profile,
        command,
        CredentialKind::Command,
        &crate::credential_command::metadata(ttl),
    )?;
    super::providers::accept_on_store(home, &vault, provider, "broker add")?;
    audit(
        home,
        &vault,
        EventKind::CredentialAdded,
        &provider.name,
        &args.profile,
    );
    eprintln!(
        "stored a command for the {} key (profile {}): it runs when the key is needed, its output reused for {} s",
        provider.display_name, args.profile, args.ttl
    );
    Ok(ExitCode::SUCCESS)
}

fn read_secret(provider: &Provider) -> anyhow::Result<Zeroizing<String>> {
    let prompt = format!("{} key for broker (input hidden): ", provider.display_name);
    let secret = read_hidden(&prompt, "the secret")?;
    if secret.is_empty() {
        bail!(
            "no secret given: pipe it on stdin, e.g. `pass show {0} | broker add {0}`",
            provider.name
        );
    }
    Ok(secret)
}

/// [`read_secret`] for a provider this process may not know (the system broker's catalog
/// decides; it checks the key's format).
fn read_secret_for(provider: &str) -> anyhow::Result<Zeroizing<String>> {
    let name = printable_name(provider);
    let secret = read_hidden(
        &format!("{name} key for the system broker (input hidden): "),
        "the secret",
    )?;
    if secret.is_empty() {
        bail!("no secret given: pipe it on stdin, e.g. `pass show {name} | broker add {name} --system`");
    }
    Ok(secret)
}

/// A secret typed at a no-echo `prompt`, or all of stdin when it is not a terminal (at most
/// [`MAX_SECRET_LEN`] bytes, UTF-8), less one trailing newline. `what` names it in errors.
pub(super) fn read_hidden(prompt: &str, what: &str) -> anyhow::Result<Zeroizing<String>> {
    let mut secret = if std::io::stdin().is_terminal() {
        Zeroizing::new(
            rpassword::prompt_password(prompt).with_context(|| format!("cannot read {what}"))?,
        )
    } else {
        let mut buf = Zeroizing::new(Vec::new());
        std::io::stdin()
            .take(MAX_SECRET_LEN as u64 + 2)
            .read_to_end(&mut buf)
            .with_context(|| format!("cannot read {what} from stdin"))?;
        match String::from_utf8(std::mem::take(&mut *buf)) {
            Ok(s) => Zeroizing::new(s),
            Err(e) => {
                drop(Zeroizing::new(e.into_bytes()));
                bail!("{what} on stdin is not UTF-8 text");
            }
        }
    };
    if secret.ends_with('\n') {
        secret.pop();
        if secret.ends_with('\r') {
            secret.pop();
        }
    }
    Ok(secret)
}

/// Record a vault change. A failure to audit is reported but does not undo the change.
fn audit(home: &Home, vault: &Vault, kind: EventKind, provider: &str, profile: &str) {
    let event = AuditEvent {
        provider: Some(provider.to_string()),
        profile: Some(profile.to_string()),
        pid: Some(std::process::id()),
        command: Some(format!(
            "broker {}",
            if kind == EventKind::CredentialAdded {
                "add"
            } else {
                "remove"
            }
        )),
        ..AuditEvent::new(kind)
    };
    if let Err(err) = Audit::open(home, vault).and_then(|a| a.append(event)) {
        eprintln!("broker: warning: {err}");
    }
}

/// `2025-01-31T12:00:00.123Z` -> `2025-01-31 12:00:00`.
pub(crate) fn short_time(rfc3339: &str) -> String {
    rfc3339
        .get(..19)
        .map(|s| s.replace('T', " "))
        .unwrap_or_else(|| rfc3339.to_string())
}
