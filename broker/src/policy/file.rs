//! The policy file format (`$BROKER_HOME/policy.toml`, `broker run --policy FILE`), parsed
//! strictly: an unknown field, an unknown provider, a lower-case method or a pattern not in
//! normal form is an error naming the file, line and field, never a rule that silently allows
//! more (or nothing). The README's "Policy" section shows a worked file.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::budget::Limits;
use super::rules::Rule;
use super::Mode;
use crate::providers::{line_col, Catalog};

/// One parsed file.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    /// Where it came from, for messages (`$BROKER_HOME/policy.toml`, a path, `--allow`).
    pub origin: String,
    pub mode: Option<Mode>,
    /// `[run]`: the budgets of each run as a whole.
    pub run: Limits,
    /// `[providers.NAME]`.
    pub providers: BTreeMap<String, ProviderRules>,
    /// `[profiles.PROFILE.providers.NAME]`: applies when the run uses that profile for NAME.
    pub profiles: BTreeMap<String, BTreeMap<String, ProviderRules>>,
}

/// What one table says about one provider.
#[derive(Debug, Clone, Default)]
pub struct ProviderRules {
    /// `None`: this table sets no method/path rules. `Some(empty)`: nothing is allowed.
    pub allow: Option<Vec<Rule>>,
    pub require_placeholder: bool,
    pub encoded_slashes: bool,
    pub limits: Limits,
    /// How long a request waits for `broker approve` (`approve_timeout`, seconds).
    pub approve_timeout: Option<std::time::Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    mode: Option<Spanned<String>>,
    run: Option<RawLimits>,
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, RawProvider>,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, RawProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    allow: Option<Vec<Spanned<RawAllow>>>,
    approve_timeout: Option<Spanned<u64>>,
    #[serde(default)]
    require_placeholder: bool,
    #[serde(default)]
    encoded_slashes: bool,
    requests_per_minute: Option<Spanned<u32>>,
    max_requests: Option<u64>,
    max_body_bytes: Option<u64>,
}

/// `"METHOD /path"`, or `{ rule = "METHOD /path", approve = "each" }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawAllow {
    Rule(String),
    Table(RawAllowTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowTable {
    rule: String,
    approve: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_minute: Option<Spanned<u32>>,
    max_requests: Option<u64>,
    max_body_bytes: Option<u64>,
}

/// A policy that cannot be used: `file:line:col: field 'x': what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        field: &str,
        message: impl AsRef<str>,
    ) -> PolicyError {
        let at = match span {
            Some(span) => {
                let (line, col) = line_col(self.text, span.start);
                format!(":{line}:{col}")
            }
            None => String::new(),
        };
        PolicyError(format!(
            "{}{at}: field '{field}': {}",
            self.origin,
            message.as_ref()
        ))
    }
}

/// Parse and check one policy file against the providers the broker knows.
pub fn parse(text: &str, origin: &str, catalog: &Catalog) -> Result<Layer, PolicyError> {
    let cx = Ctx { origin, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let (l, c) = line_col(text, s.start);
                format!(":{l}:{c}")
            })
            .unwrap_or_default();
        PolicyError(format!(
            "{origin}{at}: {}",
            e.message().trim().replace('`', "'")
        ))
    })?;
    let mode = match &raw.mode {
        None => None,
        Some(m) => {
            Some(Mode::parse(m.get_ref()).map_err(|why| cx.err(Some(m.span()), "mode", why))?)
        }
    };
    let run = match &raw.run {
        None => Limits::default(),
        Some(r) => limits(
            &cx,
            "run",
            r.requests_per_minute.as_ref(),
            r.max_requests,
            r.max_body_bytes,
        )?,
    };
    let providers = providers(&cx, "providers", &raw.providers, catalog)?;
    let mut profiles = BTreeMap::new();
    for (name, profile) in &raw.profiles {
        let field = format!("profiles.{name}.providers");
        profiles.insert(
            name.clone(),
            self::providers(&cx, &field, &profile.providers, catalog)?,
        );
    }
    Ok(Layer {
        origin: origin.to_string(),
        mode,
        run,
        providers,
        profiles,
    })
}

fn providers(
    cx: &Ctx<'_>,
    field: &str,
    raw: &BTreeMap<Spanned<String>, RawProvider>,
    catalog: &Catalog,
) -> Result<BTreeMap<String, ProviderRules>, PolicyError> {
    let mut out = BTreeMap::new();
    for (name, p) in raw {
        let field = format!("{field}.{}", name.get_ref());
        if catalog.get(name.get_ref()).is_none() {
            return Err(cx.err(
                Some(name.span()),
                &field,
                format!(
                    "unknown provider '{}' (see 'broker providers')",
                    name.get_ref()
                ),
            ));
        }
        let allow = match &p.allow {
            None => None,
            Some(list) => {
                let mut rules = Vec::with_capacity(list.len());
                for entry in list {
                    let field = format!("{field}.allow");
                    let rule = match entry.get_ref() {
                        RawAllow::Rule(text) => Rule::parse(text),
                        RawAllow::Table(t) => Rule::parse(&t.rule).and_then(|mut r| {
                            r.approve = super::rules::Approve::parse(&t.approve)?;
                            Ok(r)
                        }),
                    };
                    rules.push(rule.map_err(|why| cx.err(Some(entry.span()), &field, why))?);
                }
                Some(rules)
            }
        };
        let approve_timeout = match &p.approve_timeout {
            None => None,
            Some(s) if (1..=crate::approvals::MAX_TIMEOUT.as_secs()).contains(s.get_ref()) => {
                Some(std::time::Duration::from_secs(*s.get_ref()))
            }
            Some(s) => {
                return Err(cx.err(
                    Some(s.span()),
                    &format!("{field}.approve_timeout"),
                    format!(
                        "seconds from 1 to {}",
                        crate::approvals::MAX_TIMEOUT.as_secs()
                    ),
                ))
            }
        };
        out.insert(
            name.get_ref().clone(),
            ProviderRules {
                allow,
                require_placeholder: p.require_placeholder,
                encoded_slashes: p.encoded_slashes,
                approve_timeout,
                limits: limits(
                    cx,
                    &field,
                    p.requests_per_minute.as_ref(),
                    p.max_requests,
                    p.max_body_bytes,
                )?,
            },
        );
    }
    Ok(out)
}

fn limits(
    cx: &Ctx<'_>,
    field: &str,
    per_minute: Option<&Spanned<u32>>,
    max_requests: Option<u64>,
    max_body_bytes: Option<u64>,
) -> Result<Limits, PolicyError> {
    if let Some(n) = per_minute {
        if *n.get_ref() == 0 {
            return Err(cx.err(
                Some(n.span()),
                &format!("{field}.requests_per_minute"),
                "0 would refuse every request: leave the provider out of --allow instead, or give a positive number",
            ));
        }
    }
    Ok(Limits {
        requests_per_minute: per_minute.map(|n| *n.get_ref()),
        max_requests,
        max_body_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Layer {
        parse(text, "policy.toml", &Catalog::builtin()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> String {
        match parse(text, "policy.toml", &Catalog::builtin()) {
            Ok(_) => panic!("taken: {text}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn a_worked_file_parses() {
        let layer = parse_ok(
            r#"
mode = "enforce"
[run]
requests_per_minute = 120
[providers.openai]
allow = ["POST /v1/responses", "GET /v1/models"]
require_placeholder = true
max_body_bytes = 1048576
[profiles.ci.providers.github]
allow = ["GET /repos/**"]
"#,
        );
        assert_eq!(layer.mode, Some(Mode::Enforce));
        assert_eq!(layer.run.requests_per_minute, Some(120));
        let openai = &layer.providers["openai"];
        assert_eq!(openai.allow.as_ref().map(Vec::len), Some(2));
        assert!(openai.require_placeholder);
        assert!(layer.profiles["ci"]["github"].allow.is_some());
    }

    #[test]
    fn typos_are_errors_with_line_and_field() {
        let e = parse_err("[providers.openai]\nalow = [\"GET /v1/models\"]\n");
        assert!(
            e.starts_with("policy.toml:2:1:") && e.contains("alow"),
            "{e}"
        );
        let e = parse_err("[providers.opnai]\nallow = []\n");
        assert!(
            e.contains(":1:") && e.contains("unknown provider 'opnai'"),
            "{e}"
        );
        let e = parse_err("[providers.openai]\nallow = [\"GET /v1/models\", \"get /v1/x\"]\n");
        assert!(
            e.starts_with("policy.toml:2:") && e.contains("providers.openai.allow"),
            "{e}"
        );
        let e = parse_err("mode = \"dry\"\n");
        assert!(e.contains("field 'mode'"), "{e}");
        let e = parse_err("[providers.openai]\nrequests_per_minute = 0\n");
        assert!(e.contains("requests_per_minute"), "{e}");
        let e = parse_err("[providers.openai]\nrequire_placeholder = \"yes\"\n");
        assert!(e.starts_with("policy.toml:2:"), "{e}");
    }
}
