//! `broker rekey --to SOURCE`: move the vault's master key to another source, or replace it
//! in the same one (a new passphrase, a new key file).
//!
//! The new passphrase comes from `BROKER_NEW_PASSPHRASE`, stdin when it is not a terminal,
//! or a no-echo prompt typed twice; never from argv.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use zeroize::Zeroizing;

use super::credentials::read_hidden;
use crate::audit::{Audit, AuditEvent, EventKind};
use crate::home::Home;
use crate::vault::{KeyConfig, KeySource, Vault};

/// Where `broker rekey` reads the new passphrase first.
pub use crate::hardening::ENV_NEW_PASSPHRASE;

#[derive(Debug, Args)]
#[command(
    after_help = "The vault is unlocked as usual (BROKER_PASSPHRASE for a passphrase \
vault). With --to passphrase the new passphrase is read from BROKER_NEW_PASSPHRASE, else from \
stdin when it is not a terminal, else from a prompt that does not echo (typed twice).\n\n\
The stored secrets stay sealed under the same data key, so a running `broker serve` that has \
unlocked the vault keeps working (restarted, it needs the new source); only what unlocks the \
vault changes. The key file or keyring entry that no longer \
unlocks it is removed. \
Copies of the vault made before (backups) still open with the old key."
)]
pub struct RekeyArgs {
    /// Where the new master key is kept: passphrase, keyring or file (the same source as now
    /// replaces the key there, except the keyring).
    #[arg(long, value_name = "SOURCE", value_parser = parse_source)]
    pub to: KeySource,
}

fn parse_source(text: &str) -> Result<KeySource, String> {
    KeySource::parse(text).ok_or_else(|| "use passphrase, keyring or file".to_string())
}

pub fn run(args: RekeyArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env().context("cannot locate BROKER_HOME")?;
    if !Vault::exists(&home) {
        bail!(
            "there is no vault at {} yet: `broker add` creates one",
            home.vault_path().display()
        );
    }
    // The vault opens with the source it recorded, whatever BROKER_KEY_SOURCE asks for.
    let keys = KeyConfig {
        source: None,
        ..KeyConfig::from_env()?
    };
    let vault = Vault::open_with(&home, &keys)?;
    let from = vault.key_source();
    // The audit key comes from the data key, which a rekey keeps: opened now, written after.
    let audit = Audit::open(&home, &vault);
    let passphrase = match args.to {
        KeySource::Passphrase => Some(new_passphrase()?),
        _ => None,
    };
    vault.rekey(
        &home,
        &keys,
        args.to,
        passphrase.as_deref().map(String::as_str),
    )?;
    let event = AuditEvent {
        pid: Some(std::process::id()),
        command: Some(format!("broker rekey --to {}", args.to.as_str())),
        reason: Some(format!("{} -> {}", from.as_str(), args.to.as_str())),
        ..AuditEvent::new(EventKind::VaultRekeyed)
    };
    if let Err(err) = audit.and_then(|a| a.append(event)) {
        eprintln!("broker: warning: {err}");
    }
    match args.to {
        KeySource::Passphrase => eprintln!(
            "the vault is now unlocked by the new passphrase: set BROKER_PASSPHRASE to it for every broker command"
        ),
        KeySource::Keyring => eprintln!("the vault's master key is now a new key in the OS keyring"),
        KeySource::File => eprintln!(
            "the vault's master key is now a new key in {}",
            home.key_file_path().display()
        ),
    }
    if from == KeySource::Passphrase && args.to != KeySource::Passphrase {
        eprintln!("BROKER_PASSPHRASE is not needed any more");
    }
    if std::env::var_os(crate::vault::ENV_KEY_SOURCE).is_some() {
        eprintln!(
            "BROKER_KEY_SOURCE is set: make it {} or unset it",
            args.to.as_str()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn new_passphrase() -> anyhow::Result<Zeroizing<String>> {
    if let Some(pass) = crate::hardening::secret_env(ENV_NEW_PASSPHRASE).filter(|p| !p.is_empty()) {
        return Ok(pass);
    }
    let prompt = "new vault passphrase (input hidden): ";
    let typed = read_hidden(prompt, "the passphrase")?;
    // Stdin may hold more than the passphrase: its first line is the passphrase.
    let pass = Zeroizing::new(typed.lines().next().unwrap_or_default().to_string());
    if std::io::stdin().is_terminal() {
        let again = read_hidden("the same again: ", "the passphrase")?;
        if *again != *pass {
            bail!("the two passphrases differ; nothing was changed");
        }
    }
    if pass.is_empty() {
        bail!("the new passphrase is empty; nothing was changed");
    }
    Ok(pass)
}
