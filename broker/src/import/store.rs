//! The vault step of an import: one key per provider and profile, never overwriting a
//! different stored key without `--replace`.

use anyhow::bail;

use super::FoundKey;
use crate::audit::{Audit, AuditEvent, EventKind};
use crate::home::Home;
use crate::providers::Catalog;
use crate::vault::{CredentialKind, Vault};

/// What storing one provider's key does (or would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storing {
    /// Not in the vault yet.
    Add,
    /// The same key is already stored: nothing to store.
    Same,
    /// A different credential is stored and `--replace` was given.
    Replace,
    /// A different credential is stored: refused without `--replace`.
    Conflict,
}

/// One provider's key and what happens to it.
#[derive(Debug)]
pub struct Step {
    pub provider: String,
    pub storing: Storing,
    key: FoundKey,
}

/// The keys found, one per provider: two different keys for one provider cannot both go to
/// one profile, so that is an error naming the provider (never the keys).
pub fn dedupe(keys: Vec<FoundKey>) -> anyhow::Result<Vec<FoundKey>> {
    let mut out: Vec<FoundKey> = Vec::new();
    for key in keys {
        match out.iter().find(|k| k.provider == key.provider) {
            Some(k) if *k.secret != *key.secret => bail!(
                "found two different {p} keys: one profile holds one key per provider. Import them one at a time, each with its own --profile (e.g. `broker import .env FILE --profile work`); nothing was changed",
                p = key.provider
            ),
            Some(_) => {}
            None => out.push(key),
        }
    }
    Ok(out)
}

/// What storing `keys` under `profile` would do, against the vault as it is. A vault that
/// does not exist yet has nothing to conflict with; `vault` is None then.
pub fn plan(
    vault: Option<&Vault>,
    keys: Vec<FoundKey>,
    profile: &str,
    replace: bool,
) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    for key in keys {
        let storing = match vault {
            None => Storing::Add,
            Some(vault) => match (
                vault.info(&key.provider, profile)?,
                vault.get(&key.provider, profile),
            ) {
                (None, _) => Storing::Add,
                (Some(info), Ok(Some(stored)))
                    if info.kind == CredentialKind::ApiKey && stored.expose() == *key.secret =>
                {
                    Storing::Same
                }
                _ if replace => Storing::Replace,
                _ => Storing::Conflict,
            },
        };
        steps.push(Step {
            provider: key.provider.clone(),
            storing,
            key,
        });
    }
    Ok(steps)
}

/// Store the steps' keys (all or, on a conflict, none), each accepted for its provider's
/// current hosts and audited as `broker import`.
pub fn apply(
    home: &Home,
    vault: &Vault,
    catalog: &Catalog,
    steps: &[Step],
    profile: &str,
) -> anyhow::Result<()> {
    if let Some(conflict) = steps.iter().find(|s| s.storing == Storing::Conflict) {
        bail!("{}", conflict_message(&conflict.provider, profile));
    }
    for step in steps {
        if step.storing == Storing::Same {
            continue;
        }
        let Some(provider) = catalog.get(&step.provider) else {
            bail!("provider {} is no longer defined", step.provider);
        };
        vault.put(
            &provider.name,
            profile,
            &step.key.secret,
            CredentialKind::ApiKey,
        )?;
        crate::cli::providers::accept_on_store(home, vault, provider, "broker import")?;
        let event = AuditEvent {
            provider: Some(provider.name.clone()),
            profile: Some(profile.to_string()),
            pid: Some(std::process::id()),
            command: Some("broker import".to_string()),
            ..AuditEvent::new(EventKind::CredentialAdded)
        };
        if let Err(err) = Audit::open(home, vault).and_then(|a| a.append(event)) {
            eprintln!("broker: warning: {err}");
        }
    }
    Ok(())
}

pub fn conflict_message(provider: &str, profile: &str) -> String {
    format!(
        "a different {provider} credential is already stored (profile {profile}): nothing was changed. Pass --replace to overwrite it, or --profile NAME to keep both (then `broker run --profile NAME`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn found(provider: &str, secret: &str) -> FoundKey {
        FoundKey {
            provider: provider.into(),
            secret: Zeroizing::new(secret.into()),
        }
    }

    #[test]
    fn one_key_per_provider_and_the_error_names_no_key() {
        let same = dedupe(vec![
            found("openai", "k1"),
            found("openai", "k1"),
            found("groq", "k2"),
        ])
        .expect("same key twice is one key");
        assert_eq!(same.len(), 2);
        let err = dedupe(vec![
            found("openai", "first-secret"),
            found("openai", "other-secret"),
        ])
        .expect_err("two keys for one provider")
        .to_string();
        assert!(err.contains("openai") && err.contains("--profile"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn without_a_vault_everything_is_added() {
        let steps = plan(None, vec![found("openai", "k")], "default", false).expect("plan");
        assert_eq!(steps[0].storing, Storing::Add);
    }
}
