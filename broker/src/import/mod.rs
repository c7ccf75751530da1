//! `broker import`: move literal keys out of `.env` files, the shell's environment and MCP
//! client configs into the vault, and leave placeholders where they were.
//!
//! It is the permanent, explicit form of what `broker run` and the shim do for a key they
//! find in an environment (hand it over for one run). The phases, in order:
//! find (parse the file, keep every value's byte range) -> recognise (by name *and* key
//! pattern, against the catalog) -> plan (what would be stored, what rewritten; shown as is
//! for a dry run) -> store (vault first: a failure after it leaves the key in both places,
//! never in neither) -> rewrite (backup, then temp file + rename) -> record (for `--undo`).
//!
//! Nothing here prints or returns a secret: findings carry the masked form only.

use zeroize::Zeroizing;

use crate::providers::{Catalog, Provider};

pub mod dotenv;
pub mod files;
pub mod json;
pub mod mcp;
pub mod store;

/// What one found value is, and what the import does with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A real key of `provider`: stored, and replaced by its placeholder.
    Import,
    /// Already the provider's placeholder: nothing to do.
    Placeholder,
    /// A variable of `provider` whose value does not match its key pattern: left alone.
    Mismatch,
    /// A variable of `provider` whose value is a reference (`${VAR}`, `${input:id}`), escaped
    /// or on several lines: not a key written here; left alone.
    NotLiteral,
    /// Looks like a secret (by its name) but no provider claims the name: left alone.
    Unrecognised,
    /// An MCP header for a host no provider sends its key to: the broker could never swap a
    /// placeholder there, so it is left alone.
    UnmanagedHost(String),
    /// A pointer to more to import (an MCP server's `envFile`).
    Note(String),
}

/// One value the import looked at. `masked` is the masked form (`sk-…(51 chars)`), never
/// the secret.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Where in the file: `line 3`, `mcpServers.github.env`.
    pub location: String,
    /// The variable, header or argument name.
    pub name: String,
    pub provider: Option<String>,
    pub masked: String,
    pub outcome: Outcome,
    /// For `Unrecognised`: providers whose key format the value matches (a hint, never used
    /// to import).
    pub formats: Vec<String>,
}

/// A key to store: provider and secret (wiped on drop).
pub struct FoundKey {
    pub provider: String,
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for FoundKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FoundKey({}, ***)", self.provider)
    }
}

/// Recognises keys by variable name and key pattern, with the user's explicit extra names
/// (`--map VAR=PROVIDER`).
pub struct Recognizer<'a> {
    catalog: &'a Catalog,
    map: Vec<(String, String)>,
}

/// What a named value is.
pub enum Recognition<'a> {
    Key(&'a Provider),
    Placeholder(&'a Provider),
    Mismatch(&'a Provider),
    NotLiteral(&'a Provider),
    /// No provider claims the name.
    Unknown,
}

impl<'a> Recognizer<'a> {
    /// `map`: `VAR=PROVIDER` pairs; an unknown provider is an error.
    pub fn new(catalog: &'a Catalog, map: &[String]) -> anyhow::Result<Recognizer<'a>> {
        let mut pairs = Vec::new();
        for entry in map {
            let Some((var, provider)) = entry.split_once('=') else {
                anyhow::bail!(
                    "--map takes VAR=PROVIDER (e.g. --map MY_GH_TOKEN=github), got {entry:?}"
                );
            };
            if catalog.get(provider).is_none() {
                anyhow::bail!("--map {var}={provider}: unknown provider (see `broker providers`)");
            }
            pairs.push((var.to_string(), provider.to_string()));
        }
        Ok(Recognizer {
            catalog,
            map: pairs,
        })
    }

    pub fn catalog(&self) -> &'a Catalog {
        self.catalog
    }

    /// The provider whose key `name` holds: the user's `--map` first, then the catalog's
    /// `env` and `env_if_set`.
    pub fn provider_for(&self, name: &str) -> Option<&'a Provider> {
        if let Some((_, p)) = self.map.iter().find(|(var, _)| var == name) {
            return self.catalog.get(p);
        }
        self.catalog
            .providers()
            .iter()
            .find(|p| p.key_vars().any(|v| v == name))
    }

    /// `value` held in `name`; `literal` is false for references, escapes and multi-line
    /// values.
    pub fn classify(&self, name: &str, value: &str, literal: bool) -> Recognition<'a> {
        let Some(provider) = self.provider_for(name) else {
            return Recognition::Unknown;
        };
        classify_for(provider, value, literal)
    }

    /// Providers whose key pattern `value` matches, for a hint.
    pub fn formats(&self, value: &str) -> Vec<String> {
        self.catalog
            .providers()
            .iter()
            .filter(|p| p.key_matches(value) && !p.is_placeholder(value))
            .map(|p| p.name.clone())
            .collect()
    }
}

/// `value` as a key of `provider`.
pub fn classify_for<'a>(provider: &'a Provider, value: &str, literal: bool) -> Recognition<'a> {
    if provider.is_placeholder(value) {
        Recognition::Placeholder(provider)
    } else if !literal {
        Recognition::NotLiteral(provider)
    } else if provider.key_matches(value) {
        Recognition::Key(provider)
    } else {
        Recognition::Mismatch(provider)
    }
}

/// Does a variable or header name say it holds a secret? Used only to list values that are
/// left alone, never to import one.
pub fn secret_like_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|part| {
            matches!(
                part,
                "KEY"
                    | "APIKEY"
                    | "TOKEN"
                    | "SECRET"
                    | "PASSWORD"
                    | "PASSWD"
                    | "PAT"
                    | "AUTHORIZATION"
                    | "CREDENTIAL"
                    | "CREDENTIALS"
                    | "BEARER"
            ) || part.ends_with("KEY")
                || part.ends_with("TOKEN")
                || part.ends_with("SECRET")
        })
}

/// The masked form of a secret, as `broker show` prints it.
pub fn masked(secret: &str) -> String {
    crate::vault::Secret::new(secret.to_string()).masked()
}

impl Finding {
    /// A finding for `value` under `name`, from its recognition; pushes the key to `keys`
    /// when it is one to import. Returns the provider when the value should be replaced.
    pub fn from_recognition<'a>(
        location: String,
        name: &str,
        value: &str,
        recognition: Recognition<'a>,
        recognizer: &Recognizer<'a>,
        keys: &mut Vec<FoundKey>,
        findings: &mut Vec<Finding>,
    ) -> Option<&'a Provider> {
        if value.is_empty() {
            return None;
        }
        let (provider, outcome) = match recognition {
            Recognition::Key(p) => (Some(p), Outcome::Import),
            Recognition::Placeholder(p) => (Some(p), Outcome::Placeholder),
            Recognition::Mismatch(p) => (Some(p), Outcome::Mismatch),
            Recognition::NotLiteral(p) => (Some(p), Outcome::NotLiteral),
            Recognition::Unknown => {
                if !secret_like_name(name) || value.contains("${") {
                    return None;
                }
                (None, Outcome::Unrecognised)
            }
        };
        let formats = if outcome == Outcome::Unrecognised {
            recognizer.formats(value)
        } else {
            Vec::new()
        };
        let shown = match outcome {
            Outcome::Placeholder | Outcome::NotLiteral => String::new(),
            _ => masked(value),
        };
        findings.push(Finding {
            location,
            name: name.to_string(),
            provider: provider.map(|p| p.name.clone()),
            masked: shown,
            outcome: outcome.clone(),
            formats,
        });
        if outcome == Outcome::Import {
            let p = provider?;
            keys.push(FoundKey {
                provider: p.name.clone(),
                secret: Zeroizing::new(value.to_string()),
            });
            return Some(p);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_like_names() {
        for name in [
            "API_KEY",
            "GITHUB_PERSONAL_ACCESS_TOKEN",
            "x-api-key",
            "Authorization",
            "DB_PASSWORD",
            "MY_SECRET",
            "apiKey",
        ] {
            assert!(secret_like_name(name), "{name}");
        }
        for name in [
            "PATH",
            "HOME",
            "LOG_LEVEL",
            "KEYBOARD_LAYOUT",
            "TOKENIZERS_PARALLELISM",
            "SSH_AUTH_SOCK",
        ] {
            assert!(!secret_like_name(name), "{name}");
        }
    }

    #[test]
    fn recognition_needs_the_name_and_the_pattern() {
        let catalog = Catalog::builtin();
        let r = Recognizer::new(&catalog, &[]).expect("recognizer");
        let key = format!("sk-{}", "unit0test0key0that0is0long0enough");
        assert!(matches!(
            r.classify("OPENAI_API_KEY", &key, true),
            Recognition::Key(p) if p.name == "openai"
        ));
        assert!(matches!(
            r.classify("OPENAI_API_KEY", "not a key", true),
            Recognition::Mismatch(_)
        ));
        assert!(matches!(
            r.classify("OPENAI_API_KEY", "${OPENAI}", false),
            Recognition::NotLiteral(_)
        ));
        let placeholder = &catalog.get("openai").expect("openai").placeholder;
        assert!(matches!(
            r.classify("OPENAI_API_KEY", placeholder, true),
            Recognition::Placeholder(_)
        ));
        assert!(matches!(
            r.classify("MY_KEY", &key, true),
            Recognition::Unknown
        ));
        let mapped = Recognizer::new(&catalog, &["MY_KEY=openai".into()]).expect("map");
        assert!(matches!(
            mapped.classify("MY_KEY", &key, true),
            Recognition::Key(_)
        ));
        assert!(Recognizer::new(&catalog, &["MY_KEY=nope".into()]).is_err());
        assert!(Recognizer::new(&catalog, &["MY_KEY".into()]).is_err());
    }
}
