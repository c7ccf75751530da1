//! `broker import .env [FILE...]`, `broker import .env --from-env`, `broker import mcp
//! [PATH...]`: move literal keys into the vault and leave placeholders (see `crate::import`).
//!
//! A dry run unless `--apply`: the plan names variables, providers and masked values, never
//! a secret.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use crate::home::Home;
use crate::import::files::{self, Rewrite};
use crate::import::store::{self, Step, Storing};
use crate::import::{dotenv, mcp, Finding, FoundKey, Outcome, Recognizer};
use crate::providers::Catalog;
use crate::vault::Vault;

#[derive(Debug, Args)]
#[command(
    after_help = "Keys are recognised by name and format: a variable (or header, or \
argument) that a provider reads its key from (see `broker providers`), holding a value that \
matches that provider's key pattern. Without --apply nothing is changed."
)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub what: ImportWhat,
}

#[derive(Debug, Subcommand)]
pub enum ImportWhat {
    /// Keys in .env files (default ./.env), or in this shell's environment (--from-env).
    #[command(name = ".env", visible_alias = "env")]
    Env(EnvArgs),
    /// Keys in MCP client configs: Claude Desktop, Claude Code, Cursor, VS Code.
    Mcp(McpArgs),
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// The files (default: .env in the current directory).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Import from this process's environment (the shell's exported variables) instead: the
    /// keys are stored and `export NAME=<placeholder>` lines printed for the shell to eval.
    #[arg(long, conflicts_with = "files")]
    pub from_env: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Without PATH: the user's configs (~/.config/Claude/claude_desktop_config.json, \
~/.claude.json, ~/.cursor/mcp.json, ~/.config/Code/User/mcp.json) and the current directory's \
(.mcp.json, .cursor/mcp.json, .vscode/mcp.json). A PATH that is a directory means that \
project's configs."
)]
pub struct McpArgs {
    /// Config files or project directories (default: the standard locations).
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Do it: store the keys and rewrite the files (default: a dry run that shows the plan).
    #[arg(long)]
    pub apply: bool,
    /// Store the keys under this profile (`broker run --profile NAME` uses them).
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Overwrite a different credential already stored for the provider and profile.
    #[arg(long)]
    pub replace: bool,
    /// Also take VAR as holding PROVIDER's key (repeatable): for variables no provider
    /// names, e.g. --map MY_GH_TOKEN=github. The value must still match
    /// the provider's key pattern.
    #[arg(long, value_name = "VAR=PROVIDER")]
    pub map: Vec<String>,
    /// Restore the files as they were before the last import (from its backups).
    #[arg(long, conflicts_with_all = ["apply", "replace", "map"])]
    pub undo: bool,
    /// With --undo: restore even a file that changed since the import.
    #[arg(long, requires = "undo")]
    pub force: bool,
}

pub fn run(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env().context("cannot locate BROKER_HOME")?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    match args.what {
        ImportWhat::Env(args) if args.common.undo => {
            undo(&home, "env", args.files.first(), args.common.force)
        }
        ImportWhat::Mcp(args) if args.common.undo => {
            undo(&home, "mcp", args.paths.first(), args.common.force)
        }
        ImportWhat::Env(args) if args.from_env => from_env(&home, &args.common),
        ImportWhat::Env(args) => env_files(&home, args),
        ImportWhat::Mcp(args) => mcp_configs(&home, args),
    }
}

/// One file's part of an import.
struct FilePlan {
    shown: PathBuf,
    target: PathBuf,
    original: Vec<u8>,
    new_text: Option<String>,
    findings: Vec<Finding>,
    /// For MCP configs: servers wrapped, remote servers changed.
    wrapped: Vec<String>,
    remote: Vec<String>,
}

fn env_files(home: &Home, args: EnvArgs) -> anyhow::Result<ExitCode> {
    let catalog = Catalog::load(home)?;
    let recognizer = Recognizer::new(&catalog, &args.common.map)?;
    let paths = if args.files.is_empty() {
        vec![PathBuf::from(".env")]
    } else {
        args.files.clone()
    };
    let mut plans = Vec::new();
    let mut keys = Vec::new();
    for path in &paths {
        if !path.exists() {
            bail!(
                "{} does not exist: name the file to import (`broker import .env path/to/.env`), or use --from-env for the shell's environment",
                path.display()
            );
        }
        let (target, original) = files::read(path)?;
        let text = utf8(path, &original)?;
        let mut findings = Vec::new();
        let mut edits = Vec::new();
        for a in dotenv::assignments(text) {
            let recognition = recognizer.classify(&a.name, &a.value, a.literal);
            if let Some(p) = Finding::from_recognition(
                format!("line {}", a.line),
                &a.name,
                &a.value,
                recognition,
                &recognizer,
                &mut keys,
                &mut findings,
            ) {
                edits.push(crate::import::json::Edit {
                    range: a.value_span,
                    text: p.placeholder.clone(),
                });
            }
        }
        let new_text = (!edits.is_empty()).then(|| crate::import::json::apply(text, &edits));
        plans.push(FilePlan {
            shown: path.clone(),
            target,
            original,
            new_text,
            findings,
            wrapped: Vec::new(),
            remote: Vec::new(),
        });
    }
    finish(home, &catalog, &args.common, "env", plans, keys)
}

fn mcp_configs(home: &Home, args: McpArgs) -> anyhow::Result<ExitCode> {
    let catalog = Catalog::load(home)?;
    let recognizer = Recognizer::new(&catalog, &args.common.map)?;
    let locations = mcp_locations(&args.paths)?;
    if locations.is_empty() {
        eprintln!(
            "no MCP client config found in the standard places (~/.config/Claude/claude_desktop_config.json, ~/.claude.json, ~/.cursor/mcp.json, ~/.config/Code/User/mcp.json, and .mcp.json, .cursor/mcp.json, .vscode/mcp.json here): name one with `broker import mcp PATH`"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("cannot find the broker binary's own path (for the rewrapped commands)")?;
    let wrap = mcp::Wrap {
        broker: exe.to_string_lossy().into_owned(),
        profile: (args.common.profile != "default").then(|| args.common.profile.clone()),
    };
    let mut plans = Vec::new();
    let mut keys = Vec::new();
    for location in &locations {
        let (target, original) = files::read(&location.path)?;
        let text = utf8(&location.path, &original)?;
        let found = mcp::import_config(text, &recognizer, &wrap).map_err(|err| {
            anyhow::anyhow!(
                "{} ({}) is not valid JSON: {err}. Nothing was changed (in any file); fix it and run again",
                location.path.display(),
                location.client
            )
        })?;
        keys.extend(found.keys);
        plans.push(FilePlan {
            shown: location.path.clone(),
            target,
            original,
            new_text: found.new_text,
            findings: found.findings,
            wrapped: found.wrapped,
            remote: found.remote,
        });
    }
    finish(home, &catalog, &args.common, "mcp", plans, keys)
}

/// The configs named on the command line (files, or project directories), else the
/// standard locations.
fn mcp_locations(paths: &[PathBuf]) -> anyhow::Result<Vec<mcp::Location>> {
    if paths.is_empty() {
        let home_dir = std::env::var_os("HOME").map(PathBuf::from);
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        return Ok(mcp::standard_locations(home_dir.as_deref(), &cwd));
    }
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let found: Vec<_> = mcp::project_locations(path)
                .into_iter()
                .filter(|l| l.path.is_file())
                .collect();
            if found.is_empty() {
                bail!(
                    "no MCP config in {} (looked for .mcp.json, .cursor/mcp.json, .vscode/mcp.json)",
                    path.display()
                );
            }
            out.extend(found);
        } else if path.is_file() {
            out.push(mcp::Location {
                path: path.clone(),
                client: "named on the command line",
            });
        } else {
            bail!("{} does not exist", path.display());
        }
    }
    Ok(out)
}

/// Show the plan; with `--apply`, store the keys and rewrite the files.
fn finish(
    home: &Home,
    catalog: &Catalog,
    common: &CommonArgs,
    kind: &str,
    plans: Vec<FilePlan>,
    keys: Vec<FoundKey>,
) -> anyhow::Result<ExitCode> {
    // A file named twice (or by two names) is imported once.
    let mut plans = plans;
    let mut seen = Vec::new();
    plans.retain(|p| {
        let first = !seen.contains(&p.target);
        seen.push(p.target.clone());
        first
    });
    let keys = store::dedupe(keys)?;
    let vault = open_vault(home, common.apply)?;
    let steps = store::plan(vault.as_ref(), keys, &common.profile, common.replace)?;
    let mut out = std::io::stdout().lock();
    for plan in &plans {
        print_file(&mut out, plan, &steps, common, catalog)?;
    }
    let conflicts: Vec<&Step> = steps
        .iter()
        .filter(|s| s.storing == Storing::Conflict)
        .collect();
    let changing: Vec<&FilePlan> = plans.iter().filter(|p| p.new_text.is_some()).collect();
    if !common.apply {
        writeln!(out)?;
        if changing.is_empty() && steps.iter().all(|s| s.storing == Storing::Same) {
            writeln!(out, "nothing to import.")?;
        } else {
            writeln!(out, "dry run: nothing was changed. Run again with --apply to store {} key(s) and rewrite {} file(s).", steps.iter().filter(|s| s.storing != Storing::Same).count(), changing.len())?;
        }
        for c in conflicts {
            writeln!(
                out,
                "--apply would refuse: {}",
                store::conflict_message(&c.provider, &common.profile)
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(c) = conflicts.first() {
        bail!("{}", store::conflict_message(&c.provider, &common.profile));
    }
    if let Some(vault) = &vault {
        store::apply(home, vault, catalog, &steps, &common.profile)?;
    }
    let rewrites: Vec<Rewrite> = changing
        .iter()
        .map(|p| Rewrite {
            shown: p.shown.clone(),
            target: p.target.clone(),
            original: p.original.clone(),
            new: p.new_text.clone().unwrap_or_default().into_bytes(),
        })
        .collect();
    let records = files::commit(home, kind, &rewrites)?;
    writeln!(out)?;
    for s in &steps {
        let what = match s.storing {
            Storing::Add => "stored",
            Storing::Replace => "replaced",
            _ => continue,
        };
        writeln!(
            out,
            "{what} the {} key (profile {}) in the vault",
            s.provider, common.profile
        )?;
    }
    for (r, p) in records.iter().zip(&changing) {
        writeln!(
            out,
            "rewrote {} (backup: {}, mode 0600)",
            p.shown.display(),
            r.backup.display()
        )?;
    }
    if records.is_empty() && steps.iter().all(|s| s.storing == Storing::Same) {
        writeln!(out, "nothing to import: no file changed.")?;
        return Ok(ExitCode::SUCCESS);
    }
    let profile = if common.profile == "default" {
        String::new()
    } else {
        format!(" --profile {}", common.profile)
    };
    if kind == "env" {
        writeln!(out, "Agents get the keys through the broker: `broker run{profile} -- CMD`. A program that reads this file without broker now sends placeholders, which providers refuse.")?;
    } else {
        writeln!(out, "Restart the MCP clients to load the changed configs. Undo: `broker import mcp --undo`.")?;
    }
    writeln!(out, "The backups hold the keys as they were: delete them once you no longer need `--undo` ({}).", files::backups_dir(home).display())?;
    Ok(ExitCode::SUCCESS)
}

/// The vault, to compare with and store into. A dry run does not create one, and one it
/// cannot open (a passphrase not given) is compared with nothing, said on stderr.
fn open_vault(home: &Home, apply: bool) -> anyhow::Result<Option<Vault>> {
    if apply {
        return Ok(Some(Vault::open(home)?));
    }
    if !Vault::exists(home) {
        return Ok(None);
    }
    match Vault::open(home) {
        Ok(v) => Ok(Some(v)),
        Err(err) => {
            eprintln!("broker: cannot open the vault to compare with what is stored ({err}); the plan below assumes nothing is stored");
            Ok(None)
        }
    }
}

fn print_file(
    out: &mut impl std::io::Write,
    plan: &FilePlan,
    steps: &[Step],
    common: &CommonArgs,
    catalog: &Catalog,
) -> anyhow::Result<()> {
    writeln!(out, "{}", plan.shown.display())?;
    if plan.findings.is_empty() {
        writeln!(out, "  no keys found")?;
    }
    for f in &plan.findings {
        let provider = f.provider.as_deref().unwrap_or("-");
        let action = describe(f, steps, common, catalog);
        writeln!(
            out,
            "  {:<24} {:<28} {:<12} {:<18} {action}",
            f.location, f.name, provider, f.masked
        )?;
    }
    for label in &plan.wrapped {
        writeln!(
            out,
            "  {label}: the server starts under `broker run` (command and args rewrapped)"
        )?;
    }
    for label in &plan.remote {
        writeln!(out, "  {label}: a remote server: the MCP client sends this header itself, so the client must run under `broker run` (e.g. `broker run -- claude`); otherwise it sends the placeholder and the server refuses it")?;
    }
    Ok(())
}

fn describe(f: &Finding, steps: &[Step], common: &CommonArgs, catalog: &Catalog) -> String {
    let provider = f.provider.as_deref().unwrap_or("");
    match &f.outcome {
        Outcome::Import => {
            let storing = steps.iter().find(|s| s.provider == provider).map(|s| &s.storing);
            let vault = match storing {
                Some(Storing::Same) => "already in the vault".to_string(),
                Some(Storing::Replace) => format!("replaces the stored key (profile {})", common.profile),
                Some(Storing::Conflict) => format!("CONFLICT: a different {provider} key is stored (profile {})", common.profile),
                _ => format!("to the vault (profile {})", common.profile),
            };
            format!("{vault}; the placeholder goes here")
        }
        Outcome::Placeholder => "already the placeholder".into(),
        Outcome::Mismatch => format!(
            "does not look like a {provider} key (pattern {}): left alone",
            catalog.get(provider).map_or("", |p| p.key_pattern.as_str())
        ),
        Outcome::NotLiteral => "a reference, escaped or multi-line value, not a key written here: left alone".into(),
        Outcome::Unrecognised => {
            let hint = if f.formats.is_empty() {
                String::new()
            } else {
                format!("; its format fits {}", f.formats.join(", "))
            };
            format!(
                "looks like a secret, but no provider reads {}: left alone{hint} (to import it: --map {}=PROVIDER)",
                f.name, f.name
            )
        }
        Outcome::UnmanagedHost(host) => format!(
            "{host} is not a host any provider sends its key to, so the broker could not swap a placeholder there: left alone"
        ),
        Outcome::Note(note) => note.clone(),
    }
}

/// `broker import .env --from-env`: the keys in this process's environment. The shell that
/// started it cannot be changed from here: the plan goes to stderr, and with `--apply` the
/// `export NAME=<placeholder>` lines go to stdout, for `eval "$(...)"`.
fn from_env(home: &Home, common: &CommonArgs) -> anyhow::Result<ExitCode> {
    let catalog = Catalog::load(home)?;
    let recognizer = Recognizer::new(&catalog, &common.map)?;
    let mut findings = Vec::new();
    let mut keys = Vec::new();
    let mut exports = Vec::new();
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    vars.sort();
    for (name, value) in &vars {
        let recognition = recognizer.classify(name, value, true);
        if matches!(recognition, crate::import::Recognition::Unknown) {
            continue;
        }
        if let Some(p) = Finding::from_recognition(
            "environment".into(),
            name,
            value,
            recognition,
            &recognizer,
            &mut keys,
            &mut findings,
        ) {
            exports.push(format!("export {name}={}", p.placeholder));
        }
    }
    drop(vars);
    // Our own environment block holds them too (`/proc/<pid>/environ`): out with them.
    let names: Vec<String> = exports
        .iter()
        .filter_map(|l| Some(l.strip_prefix("export ")?.split('=').next()?.to_string()))
        .collect();
    crate::hardening::forget_env(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let keys = store::dedupe(keys)?;
    let vault = open_vault(home, common.apply)?;
    let steps = store::plan(vault.as_ref(), keys, &common.profile, common.replace)?;
    let plan = FilePlan {
        shown: PathBuf::from("the environment"),
        target: PathBuf::new(),
        original: Vec::new(),
        new_text: None,
        findings,
        wrapped: Vec::new(),
        remote: Vec::new(),
    };
    let mut err = std::io::stderr().lock();
    print_file(&mut err, &plan, &steps, common, &catalog)?;
    if exports.is_empty() {
        writeln!(err, "no real keys in the environment.")?;
        return Ok(ExitCode::SUCCESS);
    }
    if !common.apply {
        writeln!(err, "dry run: nothing was stored. With --apply, the keys are stored and the `export` lines for your shell printed: eval \"$(broker import .env --from-env --apply)\"")?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(c) = steps.iter().find(|s| s.storing == Storing::Conflict) {
        bail!("{}", store::conflict_message(&c.provider, &common.profile));
    }
    if let Some(vault) = &vault {
        store::apply(home, vault, &catalog, &steps, &common.profile)?;
    }
    let mut out = std::io::stdout().lock();
    for line in &exports {
        writeln!(out, "{line}")?;
    }
    let stored = steps.iter().filter(|s| s.storing != Storing::Same).count();
    writeln!(err, "stored {stored} key(s) (profile {}; {} already there). This command cannot change your shell: eval the lines above (`eval \"$(broker import .env --from-env --apply)\"` does both), and remove the keys from where your shell sets them:", common.profile, steps.len() - stored)?;
    let names: Vec<&str> = exports
        .iter()
        .filter_map(|l| l.strip_prefix("export ")?.split('=').next())
        .collect();
    report_rc_files(&mut err, &names)?;
    Ok(ExitCode::SUCCESS)
}

/// Where the usual shell startup files assign `names`, by file and line (never the value).
fn report_rc_files(err: &mut impl std::io::Write, names: &[&str]) -> anyhow::Result<()> {
    let Some(home_dir) = std::env::var_os("HOME").map(PathBuf::from) else {
        return Ok(());
    };
    let mut any = false;
    for rc in [
        ".bashrc",
        ".bash_profile",
        ".bash_login",
        ".profile",
        ".zshrc",
        ".zshenv",
        ".zprofile",
    ] {
        let path = home_dir.join(rc);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        for a in dotenv::assignments(text) {
            if names.contains(&a.name.as_str()) {
                writeln!(
                    err,
                    "  {}:{} sets {}: `broker import .env {}` puts the placeholder there",
                    path.display(),
                    a.line,
                    a.name,
                    path.display()
                )?;
                any = true;
            }
        }
    }
    if !any {
        writeln!(err, "  (not set in ~/.bashrc, ~/.profile, ~/.zshrc or their siblings: look wherever else your shell gets them)")?;
    }
    Ok(())
}

fn undo(home: &Home, kind: &str, only: Option<&PathBuf>, force: bool) -> anyhow::Result<ExitCode> {
    let restored = files::undo(home, kind, only.map(Path::new), force)?;
    for r in &restored {
        println!("restored {} from {}", r.path.display(), r.backup.display());
    }
    println!("The keys stay in the vault (`broker list`; `broker remove PROVIDER` to drop one).");
    Ok(ExitCode::SUCCESS)
}

fn utf8<'b>(path: &Path, bytes: &'b [u8]) -> anyhow::Result<&'b str> {
    std::str::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {}): nothing was changed",
            path.display(),
            e.valid_up_to()
        )
    })
}
