//! `broker providers [show NAME] [--json]`: the provider catalog, built-in and custom.
//!
//! Loading the catalog reads every custom file, so this command is also how a user checks a
//! new `$BROKER_HOME/providers/*.toml`: a malformed file fails here, naming file, line and field.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::home::Home;
use crate::providers::{AuthKind, Catalog, Provider};

#[derive(Debug, Args)]
#[command(
    after_help = "`broker providers trust NAME` reviews where the definition in effect sends \
NAME's key, against what you accepted (when you stored the key, or the built-in definition), and \
records it: until then a key is not sent to a host a custom file or an upgrade added."
)]
pub struct ProvidersArgs {
    /// `show NAME` prints one provider's definition (`NAME` alone does too); `trust NAME`
    /// accepts the hosts its definition in effect sends the key to.
    #[arg(num_args = 0..=2, value_name = "show|trust NAME")]
    pub what: Vec<String>,
    /// Print JSON instead of a table or TOML.
    #[arg(long)]
    pub json: bool,
    /// With `trust`: accept without asking.
    #[arg(long)]
    pub yes: bool,
}

pub fn run(args: ProvidersArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env().context("cannot find the broker home")?;
    let catalog = Catalog::load(&home)?;
    if let [verb, name] = args.what.as_slice() {
        if verb == "trust" {
            let provider = lookup(&catalog, name)?;
            return trust(&home, provider, args.yes);
        }
    }
    let out = render(&catalog, &args)?;
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `broker providers trust NAME`: show what the definition in effect adds to what was
/// accepted, ask (or `--yes`), record it in the vault and the audit.
fn trust(home: &Home, provider: &Provider, yes: bool) -> anyhow::Result<ExitCode> {
    use crate::providers::trust;
    let vault = crate::vault::Vault::open(home)?;
    let accepted = vault
        .trusted_grants(&provider.name)?
        .or_else(|| trust::builtin_grants(&provider.name))
        .unwrap_or_default();
    let current = trust::grants(provider);
    let review = trust::review(&accepted, &current);
    println!("{} is defined by {}.", provider.name, provider.origin());
    if review.added.is_empty() {
        println!("Nothing to accept: its key goes only where you accepted.");
        return Ok(ExitCode::SUCCESS);
    }
    println!("Compared with what you accepted, its key would also go to:");
    for grant in &review.added {
        println!("  + {}", trust::describe(grant));
    }
    if !review.removed.is_empty() {
        println!("and no longer to:");
        for grant in &review.removed {
            println!("  - {}", trust::describe(grant));
        }
    }
    if !yes {
        use std::io::IsTerminal as _;
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("nothing was accepted: confirm with --yes (no terminal to ask on)");
        }
        print!("Accept? [y/N] ");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("Nothing was accepted.");
            return Ok(ExitCode::FAILURE);
        }
    }
    vault.set_trusted_grants(&provider.name, &current)?;
    record_trust(
        home,
        &vault,
        &provider.name,
        &review.added,
        "broker providers trust",
    );
    println!(
        "Accepted: {}'s key may go to these hosts now.",
        provider.name
    );
    Ok(ExitCode::SUCCESS)
}

/// The audit line of an acceptance: which hosts, by which process.
pub(crate) fn record_trust(
    home: &Home,
    vault: &crate::vault::Vault,
    provider: &str,
    added: &[String],
    command: &str,
) {
    use crate::audit::{Audit, AuditEvent, EventKind};
    let hosts: Vec<String> = added
        .iter()
        .map(|g| crate::providers::trust::describe(g))
        .collect();
    let event = AuditEvent {
        provider: Some(provider.to_string()),
        pid: Some(std::process::id()),
        command: Some(command.to_string()),
        reason: Some(format!("accepted: {}", hosts.join("; "))),
        ..AuditEvent::new(EventKind::ProviderTrusted)
    };
    if let Err(err) = Audit::open(home, vault).and_then(|a| a.append(event)) {
        eprintln!("broker: warning: {err}");
    }
}

/// After a credential is stored (`broker add`, `broker login`): the definition in effect is
/// what the user stored it for, so its grants become the accepted ones. What that adds to
/// the grants accepted before (or to the built-in definition) is said, and audited.
pub(crate) fn accept_on_store(
    home: &Home,
    vault: &crate::vault::Vault,
    provider: &Provider,
    command: &str,
) -> anyhow::Result<()> {
    use crate::providers::trust;
    let before = vault
        .trusted_grants(&provider.name)?
        .or_else(|| trust::builtin_grants(&provider.name))
        .unwrap_or_default();
    let current = trust::grants(provider);
    vault.set_trusted_grants(&provider.name, &current)?;
    let review = trust::review(&before, &current);
    if !review.added.is_empty() && !before.is_empty() {
        eprintln!(
            "broker: note: {} is defined by {}, which also sends its key to:",
            provider.name,
            provider.origin()
        );
        for grant in &review.added {
            eprintln!("  + {}", trust::describe(grant));
        }
        record_trust(home, vault, &provider.name, &review.added, command);
    }
    Ok(())
}

/// What the command prints, for `args` against `catalog`.
pub fn render(catalog: &Catalog, args: &ProvidersArgs) -> anyhow::Result<String> {
    let name = match args.what.as_slice() {
        [] => None,
        [show, name] if show == "show" => Some(name.as_str()),
        [show] if show == "show" => anyhow::bail!("usage: broker providers show NAME"),
        [name] => Some(name.as_str()),
        _ => anyhow::bail!("usage: broker providers [show NAME] [--json]"),
    };
    match name {
        None if args.json => Ok(json_line(catalog.providers())?),
        None => Ok(table(catalog)),
        Some(name) => {
            let provider = lookup(catalog, name)?;
            if args.json {
                Ok(json_line(provider)?)
            } else {
                Ok(show(provider))
            }
        }
    }
}

fn json_line<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    let mut out = serde_json::to_string_pretty(value)?;
    out.push('\n');
    Ok(out)
}

/// One line per provider: name, auth, env vars, hosts (hosts last: the widest column).
fn table(catalog: &Catalog) -> String {
    let rows: Vec<[String; 4]> = catalog
        .providers()
        .iter()
        .map(|p| {
            let mut hosts: Vec<String> = Vec::new();
            for spec in p.routes.iter().flat_map(|r| &r.hosts) {
                let s = spec.to_string();
                if !hosts.contains(&s) {
                    hosts.push(s);
                }
            }
            let mut name = p.name.clone();
            if !p.origin().is_builtin() {
                name.push('*');
            }
            let auth = match (p.auth, &p.oauth) {
                (AuthKind::ApiKey, Some(_)) => "api_key+oauth2".to_string(),
                (auth, _) => auth.to_string(),
            };
            [name, auth, p.env.join(","), hosts.join(", ")]
        })
        .collect();
    let header = ["NAME", "AUTH", "ENV", "HOSTS"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3]]);
    }
    if catalog.providers().iter().any(|p| !p.origin().is_builtin()) {
        out.push_str("* custom definition from the providers directory\n");
    }
    out
}

/// The definition as TOML, exactly as written (a built-in is the template for a custom file).
fn show(p: &Provider) -> String {
    let source = if p.origin().is_builtin() {
        "built in; copy to $BROKER_HOME/providers/ to change it".to_string()
    } else {
        format!("from {}", p.origin())
    };
    let mut out = format!("# {} ({source})\n", p.display_name);
    out.push_str(p.source_text());
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn lookup<'a>(catalog: &'a Catalog, name: &str) -> anyhow::Result<&'a Provider> {
    let wanted = name.to_ascii_lowercase();
    if let Some(p) = catalog.get(&wanted) {
        return Ok(p);
    }
    // "Hugging Face", "google gemini": match display names too.
    let squash = |s: &str| s.to_ascii_lowercase().replace([' ', '-', '_'], "");
    if let Some(p) = catalog
        .providers()
        .iter()
        .find(|p| squash(&p.display_name) == squash(name))
    {
        return Ok(p);
    }
    let close = close_names(catalog, &wanted);
    if close.is_empty() {
        anyhow::bail!("unknown provider '{name}'; 'broker providers' lists them all")
    }
    anyhow::bail!(
        "unknown provider '{name}'; did you mean {}? ('broker providers' lists them all)",
        close.join(", ")
    )
}

/// Provider names within a small edit distance of `wanted`, or containing it, closest first.
fn close_names(catalog: &Catalog, wanted: &str) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = catalog
        .providers()
        .iter()
        .filter_map(|p| {
            let d = edit_distance(&p.name, wanted);
            let display = p.display_name.to_ascii_lowercase();
            let contains = wanted.len() >= 3
                && (p.name.contains(wanted)
                    || wanted.contains(p.name.as_str())
                    || display.contains(wanted));
            (d <= 2.max(wanted.len() / 3) || contains)
                .then_some((if contains { d.min(1) } else { d }, p.name.as_str()))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(5)
        .map(|(_, n)| n.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(what: &[&str], json: bool) -> ProvidersArgs {
        ProvidersArgs {
            what: what.iter().map(|s| s.to_string()).collect(),
            json,
            yes: false,
        }
    }

    #[test]
    fn providers_table_lists_every_provider_with_hosts_env_and_auth() {
        let catalog = Catalog::builtin();
        let out = render(&catalog, &args(&[], false)).expect("renders");
        let mut lines = out.lines();
        let header = lines.next().expect("header");
        for col in ["NAME", "AUTH", "ENV", "HOSTS"] {
            assert!(header.contains(col), "{header}");
        }
        assert_eq!(out.lines().count(), catalog.providers().len() + 1);
        let openai = out
            .lines()
            .find(|l| l.starts_with("openai "))
            .expect("openai row");
        assert!(
            openai.contains("OPENAI_API_KEY")
                && openai.contains("api.openai.com")
                && openai.contains("api_key")
        );
        let github = out
            .lines()
            .find(|l| l.starts_with("github "))
            .expect("github row");
        assert!(
            github.contains("GITHUB_TOKEN,GH_TOKEN")
                && github.contains("github.com")
                && github.contains("oauth2")
        );
    }

    #[test]
    fn providers_json_is_an_array_of_definitions() {
        let catalog = Catalog::builtin();
        let out = render(&catalog, &args(&[], true)).expect("renders");
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        let list = v.as_array().expect("array");
        assert_eq!(list.len(), catalog.providers().len());
        let gh = list.iter().find(|p| p["name"] == "github").expect("github");
        assert_eq!(gh["source"], "builtin");
        assert_eq!(gh["routes"][1]["inject"], "always");
        assert_eq!(gh["routes"][1]["credential"][0]["scheme"]["type"], "basic");
        assert_eq!(
            gh["routes"][1]["credential"][0]["scheme"]["username"],
            "x-access-token"
        );
        assert_eq!(gh["routes"][0]["hosts"][0]["pattern"], "api.github.com");
        assert_eq!(gh["routes"][0]["hosts"][0]["port"], 443);
    }

    #[test]
    fn providers_show_prints_the_toml_definition() {
        let catalog = Catalog::builtin();
        let out = render(&catalog, &args(&["show", "openai"], false)).expect("renders");
        assert!(out.starts_with("# OpenAI (built in"), "{out}");
        assert!(
            out.contains("name = \"openai\"") && out.contains("[[routes]]"),
            "{out}"
        );
        // The shown text is a valid custom file.
        let body: String = out.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert!(Provider::from_toml(&body, "copy.toml").is_ok());

        let json = render(&catalog, &args(&["show", "gemini"], true)).expect("renders");
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["env"][0], "GEMINI_API_KEY");
        assert_eq!(v["routes"][0]["credential"][1]["kind"], "query");
        assert_eq!(v["routes"][0]["credential"][1]["param"], "key");

        // A bare name and a display name work too.
        assert!(render(&catalog, &args(&["Hugging Face"], false)).is_ok());
    }

    #[test]
    fn providers_show_unknown_name_lists_close_names() {
        let catalog = Catalog::builtin();
        let err = render(&catalog, &args(&["show", "opnai"], false)).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown provider 'opnai'; did you mean openai? ('broker providers' lists them all)"
        );
        let err = render(&catalog, &args(&["show", "hugging"], false)).expect_err("unknown");
        assert!(
            err.to_string().contains("did you mean huggingface?"),
            "{err}"
        );
        let err = render(&catalog, &args(&["show", "zzzzzzzzzz"], false)).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown provider 'zzzzzzzzzz'; 'broker providers' lists them all"
        );
        assert!(render(&catalog, &args(&["show"], false)).is_err());
        assert!(render(&catalog, &args(&["list", "x"], false)).is_err());
    }
}
