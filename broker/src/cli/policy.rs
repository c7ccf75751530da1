//! `broker policy check [FILE]` and `broker policy suggest [--run ID]`: check a policy file
//! the way a run will, and turn what one run did (its audit lines) into a starting policy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use crate::home::Home;
use crate::policy::{self, path::normalize, rules::Rule};
use crate::providers::Catalog;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub action: PolicyAction,
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Check a policy file (default: $BROKER_HOME/policy.toml) as `broker run` will read it.
    Check { file: Option<PathBuf> },
    /// Print a policy allowing exactly what one run did (its credential uses, and what
    /// `--policy-mode audit` would have refused), from the audit log: a start to edit.
    Suggest {
        /// The run (its `run_id` in `broker audit`); default: the last run in the log.
        #[arg(long)]
        run: Option<String>,
    },
}

pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env()?;
    let catalog = Catalog::load(&home)?;
    match args.action {
        PolicyAction::Check { file } => {
            let path = file.unwrap_or_else(|| home.root().join(policy::HOME_POLICY_FILE));
            match policy::load_file(&path, &catalog)? {
                Some(_) => println!("{}: ok", path.display()),
                None => bail!("{}: no such file", path.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyAction::Suggest { run } => {
            let text = std::fs::read_to_string(home.audit_path())
                .with_context(|| format!("cannot read {}", home.audit_path().display()))?;
            print!("{}", suggest(&text, run.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The events that say what a run did with a provider.
const USES: &[&str] = &["credential_use", "policy_would_deny"];

/// A policy file allowing each method and path `run` (default: the last run) used, per
/// provider, from the audit log's lines. Paths are written in normal form; one that has none
/// (an encoded slash, ...) is left as a comment.
pub fn suggest(audit: &str, run: Option<&str>) -> anyhow::Result<String> {
    let events: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"].as_str().is_some_and(|e| USES.contains(&e)))
        .collect();
    let run = match run {
        Some(run) => run.to_string(),
        None => events
            .iter()
            .rev()
            .find_map(|v| v["run_id"].as_str())
            .context("the audit log holds no credential use to suggest rules from")?
            .to_string(),
    };
    let mut rules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut skipped: Vec<String> = Vec::new();
    for v in events.iter().filter(|v| v["run_id"].as_str() == Some(&run)) {
        let (Some(provider), Some(method), Some(path)) = (
            v["provider"].as_str(),
            v["method"].as_str(),
            v["path"].as_str(),
        ) else {
            continue;
        };
        let rule = normalize(path, false)
            .map_err(|why| why.reason().to_string())
            .map(|normal| format!("{method} {normal}"))
            .and_then(|text| Rule::parse(&text).map(|_| text));
        match rule {
            Ok(text) => {
                rules.entry(provider.to_string()).or_default().insert(text);
            }
            Err(why) => skipped.push(format!("{provider}: {method} {path}: {why}")),
        }
    }
    if rules.is_empty() && skipped.is_empty() {
        bail!("run '{run}' used no credential (see 'broker audit')");
    }
    let mut out = format!(
        "# Suggested by 'broker policy suggest' from run {run}: exactly the requests it made.\n\
         # Replace ids in paths with '*' (one segment) or a last '**' (the rest) where they vary.\n"
    );
    for line in &skipped {
        let _ = writeln!(out, "# not allowed (no normal form): {line}");
    }
    for (provider, allow) in &rules {
        let _ = writeln!(out, "\n[providers.{provider}]\nallow = [");
        for rule in allow {
            let _ = writeln!(out, "  {},", toml_string(rule));
        }
        out.push_str("]\n");
    }
    Ok(out)
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suggestion_allows_what_the_run_did_and_parses() {
        let audit = [
            r#"{"event":"credential_use","run_id":"r1","provider":"openai","method":"GET","path":"/v1/models"}"#,
            r#"{"event":"credential_use","run_id":"r2","provider":"openai","method":"POST","path":"/v1/./responses"}"#,
            r#"{"event":"policy_would_deny","run_id":"r2","provider":"github","method":"GET","path":"/repos/a/b"}"#,
            r#"{"event":"credential_use","run_id":"r2","provider":"openai","method":"POST","path":"/v1/responses"}"#,
            r#"{"event":"credential_use","run_id":"r2","provider":"gitlab","method":"GET","path":"/api/v4/projects/a%2Fb"}"#,
            r#"{"event":"denial","run_id":"r2","provider":"openai","method":"DELETE","path":"/v1/x"}"#,
        ]
        .join("\n");
        let text = suggest(&audit, None).expect("suggest");
        let layer = crate::policy::file::parse(&text, "s.toml", &Catalog::builtin()).expect(&text);
        let p = crate::policy::RunPolicy::compile(&[layer], |_| "default", None);
        assert!(p
            .check_rules("openai", "POST", "/v1/responses", None)
            .is_ok());
        assert!(p.check_rules("github", "GET", "/repos/a/b", None).is_ok());
        assert!(
            p.check_rules("openai", "GET", "/v1/models", None).is_err(),
            "run r1's"
        );
        assert!(
            p.check_rules("openai", "DELETE", "/v1/x", None).is_err(),
            "a denial is no use"
        );
        assert!(
            text.contains("# not allowed (no normal form): gitlab"),
            "{text}"
        );
        assert!(suggest(&audit, Some("r3")).is_err());
    }
}
