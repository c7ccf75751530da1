//! What a run may do with a key, beyond which providers it may use: method/path rules,
//! `require_placeholder`, budgets (requests a minute, in all, body size), and the mode
//! (`enforce`, or `audit`: refuse nothing, audit what would have been refused).
//!
//! Layers, each a policy file (`file`): `$BROKER_HOME/policy.toml` binds every run the broker
//! serves; `broker run --policy FILE` and `--allow PROVIDER:METHOD:/path` add layers for one
//! run. A request must pass every layer that has rules for its provider (so a run's layers can
//! only narrow the home policy), and every budget that counts it. Within a layer,
//! `[providers.NAME]` and, when the run uses profile P for NAME, `[profiles.P.providers.NAME]`
//! are both layers of their own.
//!
//! Compiled once per run ([`RunPolicy::compile`]); per request, a run without rules for the
//! provider costs one hash lookup, and one with rules a path normalisation and a match per rule.

pub mod budget;
pub mod file;
pub mod path;
pub mod query;
pub mod rules;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::audit::EventKind;
use crate::providers::Catalog;
use budget::{Budget, Over};
pub use file::{Layer, PolicyError};
use rules::{Approve, Rule};

/// The policy file every run of this home is bound by.
pub const HOME_POLICY_FILE: &str = "policy.toml";

/// A burst of refusals of one kind for one provider is audited once: its first refusal, and
/// again only after this long without one (as `proxy::limits` does for connections).
const BURST_QUIET: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    /// Refuse nothing; audit `policy_would_deny` for what `Enforce` would refuse.
    Audit,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Mode, String> {
        match text {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            other => Err(format!("'{other}' is not a mode: \"enforce\" or \"audit\"")),
        }
    }
}

/// What `broker run` adds for its run, as it travels to `broker serve` (the daemon parses and
/// checks it again: it is any local process's request).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunPolicySpec {
    /// `--policy FILE`: (the file's name, its text).
    #[serde(default)]
    pub files: Vec<(String, String)>,
    /// `--allow PROVIDER:METHOD:/path`, as given.
    #[serde(default)]
    pub allow_rules: Vec<String>,
    /// `--policy-mode`.
    #[serde(default)]
    pub mode: Option<Mode>,
}

impl RunPolicySpec {
    /// The layers this spec makes: each file, then the `--allow` rules as one layer.
    pub fn layers(&self, catalog: &Catalog) -> Result<Vec<Layer>, PolicyError> {
        let mut layers = Vec::new();
        for (origin, text) in &self.files {
            layers.push(file::parse(text, origin, catalog)?);
        }
        if !self.allow_rules.is_empty() {
            let mut layer = Layer {
                origin: "--allow".into(),
                ..Layer::default()
            };
            for flag in &self.allow_rules {
                let (provider, rule) = Rule::parse_flag(flag).map_err(PolicyError)?;
                if catalog.get(&provider).is_none() {
                    return Err(PolicyError(format!(
                        "--allow {flag}: unknown provider '{provider}' (see 'broker providers')"
                    )));
                }
                layer
                    .providers
                    .entry(provider)
                    .or_default()
                    .allow
                    .get_or_insert_with(Vec::new)
                    .push(rule);
            }
            layers.push(layer);
        }
        Ok(layers)
    }
}

/// One run's policy, compiled, with its budgets' counters.
#[derive(Debug, Default)]
pub struct RunPolicy {
    pub mode: Mode,
    providers: HashMap<String, ProviderPolicy>,
    run_budgets: Vec<Budget>,
    run_max_body: Option<(u64, String)>,
    /// When each (kind, provider) burst of refusals was last audited.
    bursts: Mutex<Vec<(EventKind, String, Instant)>>,
    /// The `once-per-run` rules already approved in this run.
    approved: Mutex<Vec<String>>,
}

/// A request the rules allow: the path (and query) that goes upstream, and whether it must
/// wait for `broker approve` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The normalised path, when it differs from the request's (which then must be rewritten).
    pub path: Option<String>,
    /// The canonical query (`query`), when a rule that allowed the request constrains the
    /// query and the request's differs from it: what was checked is what is sent.
    pub query: Option<String>,
    pub approval: Option<Approval>,
}

/// An approval a request needs: under which rule (with its file and table), how, how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub rule: String,
    pub each: bool,
    pub timeout: Duration,
}

#[derive(Debug, Default)]
struct ProviderPolicy {
    /// Each layer's rules, with the layer's name: a request must pass all of them.
    rule_sets: Vec<(String, Vec<Rule>)>,
    require_placeholder: bool,
    encoded_slashes: bool,
    budgets: Vec<Budget>,
    max_body: Option<(u64, String)>,
    approve_timeout: Option<Duration>,
}

/// Why a request is refused, and how the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// No rule allows it, or its path has no normal form (403).
    Rules,
    /// `require_placeholder` and it carries none (403).
    PlaceholderRequired,
    /// Over a requests budget (429).
    Budget,
    /// Its rule asks for approval, and it was denied or not given in time (403).
    NotApproved,
    /// Its body is larger than allowed (413).
    BodyTooLarge,
}

impl RunPolicy {
    /// Compile `layers` (the home file first) for a run whose profile for a provider is
    /// `profile_for(provider)`.
    pub fn compile<'a>(
        layers: &[Layer],
        profile_for: impl Fn(&str) -> &'a str,
        mode: Option<Mode>,
    ) -> RunPolicy {
        let mut policy = RunPolicy {
            mode: mode
                .or_else(|| layers.iter().rev().find_map(|l| l.mode))
                .unwrap_or_default(),
            ..RunPolicy::default()
        };
        for layer in layers {
            if layer.run.counts_requests() {
                policy
                    .run_budgets
                    .push(Budget::new(format!("{} [run]", layer.origin), &layer.run));
            }
            if let Some(max) = layer.run.max_body_bytes {
                tighten(
                    &mut policy.run_max_body,
                    max,
                    format!("{} [run]", layer.origin),
                );
            }
            let mut tables: Vec<(String, &String, &file::ProviderRules)> = layer
                .providers
                .iter()
                .map(|(name, rules)| (format!("{} [providers.{name}]", layer.origin), name, rules))
                .collect();
            for (profile, providers) in &layer.profiles {
                for (name, rules) in providers {
                    if profile_for(name) == profile {
                        tables.push((
                            format!("{} [profiles.{profile}.providers.{name}]", layer.origin),
                            name,
                            rules,
                        ));
                    }
                }
            }
            for (source, name, rules) in tables {
                let p = policy.providers.entry(name.clone()).or_default();
                if let Some(allow) = &rules.allow {
                    p.rule_sets.push((source.clone(), allow.clone()));
                }
                p.require_placeholder |= rules.require_placeholder;
                p.encoded_slashes |= rules.encoded_slashes;
                if let Some(t) = rules.approve_timeout {
                    p.approve_timeout = Some(p.approve_timeout.map_or(t, |old| old.min(t)));
                }
                if rules.limits.counts_requests() {
                    p.budgets.push(Budget::new(source.clone(), &rules.limits));
                }
                if let Some(max) = rules.limits.max_body_bytes {
                    tighten(&mut p.max_body, max, source);
                }
            }
        }
        policy
    }

    /// Does this run have anything to say about `provider`'s requests?
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty() && self.run_budgets.is_empty() && self.run_max_body.is_none()
    }

    /// Authorize: the rules for `provider`. `Ok(Some(allowed))`: allowed, `allowed.path` (the
    /// normalised path) and `allowed.query` are what go upstream, and `allowed.approval` says
    /// whether a matching rule asks for approval (the strictest of the layers'); `Ok(None)`:
    /// no rules for the provider. `query` is the request's, without its `?`.
    pub fn check_rules(
        &self,
        provider: &str,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Result<Option<Allowed>, Refusal> {
        let Some(p) = self.providers.get(provider) else {
            return Ok(None);
        };
        if p.rule_sets.is_empty() {
            return Ok(None);
        }
        let normal = path::normalize(path, p.encoded_slashes).map_err(|why| Refusal {
            kind: RefusalKind::Rules,
            message: format!(
                "policy: {method} {path} to {provider} is refused: {} (no rule can allow it)",
                why.reason()
            ),
        })?;
        let query = query::RequestQuery::new(query);
        let mut query_checked = false;
        let mut approval: Option<Approval> = None;
        for (source, rules) in &p.rule_sets {
            if let Some(rule) = rules.iter().find(|r| r.allows(method, &normal, &query)) {
                query_checked |= rule.constrains_query();
                let stricter = approval
                    .as_ref()
                    .is_none_or(|a| !a.each && rule.approve == Approve::Each);
                if rule.approve != Approve::No && stricter {
                    approval = Some(Approval {
                        rule: format!("{rule} ({source})"),
                        each: rule.approve == Approve::Each,
                        timeout: p
                            .approve_timeout
                            .unwrap_or(crate::approvals::DEFAULT_TIMEOUT),
                    });
                }
                continue;
            }
            let listed: Vec<String> = rules.iter().take(6).map(Rule::to_string).collect();
            let more = if rules.len() > 6 { ", ..." } else { "" };
            // The query is never quoted (it is the agent's, and may hold anything), only
            // described, and only when a rule of this layer looks at it.
            let query_note = rules
                .iter()
                .any(Rule::constrains_query)
                .then(|| query.describe())
                .flatten()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            return Err(Refusal {
                    kind: RefusalKind::Rules,
                    message: format!(
                        "policy: {method} {normal}{query_note} to {provider} is not allowed by {source} (it allows: {}{more})",
                        if listed.is_empty() { "nothing".to_string() } else { listed.join(", ") }
                    ),
                });
        }
        let path = match normal {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(normal) => Some(normal),
        };
        let query = if query_checked {
            query.rewritten()
        } else {
            None
        };
        Ok(Some(Allowed {
            path,
            query,
            approval,
        }))
    }

    /// Does `approval` still need an answer in this run (a `once-per-run` rule answered
    /// before does not)?
    pub fn needs_asking(&self, approval: &Approval) -> bool {
        approval.each || !self.lock_approved().contains(&approval.rule)
    }

    /// Remember that `approval` was granted (for a `once-per-run` rule).
    pub fn granted(&self, approval: &Approval) {
        if !approval.each {
            self.lock_approved().push(approval.rule.clone());
        }
    }

    fn lock_approved(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.approved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `require_placeholder`: refused when the provider demands the placeholder and the
    /// request carries none where the key goes.
    pub fn check_placeholder(&self, provider: &str, has_placeholder: bool) -> Result<(), Refusal> {
        match self.providers.get(provider) {
            Some(p) if p.require_placeholder && !has_placeholder => Err(Refusal {
                kind: RefusalKind::PlaceholderRequired,
                message: format!(
                    "policy: requests to {provider} must carry its placeholder where the key goes (require_placeholder): this one does not"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The largest request body allowed for `provider`, and the table that says so.
    pub fn max_body(&self, provider: &str) -> Option<(u64, &str)> {
        let own = self
            .providers
            .get(provider)
            .and_then(|p| p.max_body.as_ref());
        [own, self.run_max_body.as_ref()]
            .into_iter()
            .flatten()
            .min_by_key(|(n, _)| *n)
            .map(|(n, s)| (*n, s.as_str()))
    }

    /// Budgets: a body of `content_length` bytes over the limit, or one request more than the
    /// run's and the provider's budgets allow, is refused; else the request is counted.
    pub fn charge(
        &self,
        provider: &str,
        content_length: Option<u64>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if let (Some(length), Some((max, source))) = (content_length, self.max_body(provider)) {
            if length > max {
                return Err(body_too_large(provider, max, source));
            }
        }
        let own = self
            .providers
            .get(provider)
            .map(|p| p.budgets.as_slice())
            .unwrap_or(&[]);
        for budget in own.iter().chain(&self.run_budgets) {
            if let Err(over) = budget.charge(now) {
                let limit = match over {
                    Over::PerMinute(n) => format!("{n} requests a minute"),
                    Over::Total(n) => format!("{n} requests in all"),
                };
                return Err(Refusal {
                    kind: RefusalKind::Budget,
                    message: format!(
                        "policy: over the budget of {} ({limit}) for {provider}: wait, or raise it there",
                        budget.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether this refusal starts a burst (and so is audited): one line per kind, provider
    /// and burst, so a looping agent cannot flood the audit log.
    pub fn starts_burst(&self, kind: EventKind, provider: &str, now: Instant) -> bool {
        let mut bursts = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
        match bursts
            .iter_mut()
            .find(|(k, p, _)| *k == kind && p == provider)
        {
            Some((_, _, last)) if now.duration_since(*last) < BURST_QUIET => false,
            Some((_, _, last)) => {
                *last = now;
                true
            }
            None => {
                bursts.push((kind, provider.to_string(), now));
                true
            }
        }
    }
}

/// The refusal of a body larger than `max` (also when it is found out while streaming).
pub fn body_too_large(provider: &str, max: u64, source: &str) -> Refusal {
    Refusal {
        kind: RefusalKind::BodyTooLarge,
        message: format!(
            "policy: the request body to {provider} is larger than {max} bytes, the most {source} allows (max_body_bytes)"
        ),
    }
}

fn tighten(slot: &mut Option<(u64, String)>, max: u64, source: String) {
    if slot.as_ref().is_none_or(|(n, _)| max < *n) {
        *slot = Some((max, source));
    }
}

/// Read and parse a policy file (`$BROKER_HOME/policy.toml`), if there is one.
pub fn load_file(path: &std::path::Path, catalog: &Catalog) -> Result<Option<Layer>, PolicyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => file::parse(&text, &path.display().to_string(), catalog).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PolicyError(format!("cannot read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(texts: &[&str]) -> Vec<Layer> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| file::parse(t, &format!("f{i}"), &Catalog::builtin()).expect("parse"))
            .collect()
    }

    #[test]
    fn every_layer_must_allow_and_others_are_untouched() {
        let l = layers(&[
            "[providers.openai]\nallow = [\"POST /v1/responses\", \"GET /v1/models\"]\n",
            "[providers.openai]\nallow = [\"GET /v1/models\", \"GET /v1/files\"]\n",
        ]);
        let p = RunPolicy::compile(&l, |_| "default", None);
        assert_eq!(
            p.check_rules("openai", "GET", "/v1/./models", None)
                .map(|a| a.map(|a| a.path)),
            Ok(Some(Some("/v1/models".into())))
        );
        let e = p
            .check_rules("openai", "POST", "/v1/responses", None)
            .expect_err("second layer");
        assert!(e.message.contains("f1 [providers.openai]"), "{}", e.message);
        assert!(p.check_rules("openai", "GET", "/v1/files", None).is_err());
        assert_eq!(
            p.check_rules("github", "DELETE", "/repos/x", None),
            Ok(None)
        );
        let e = p
            .check_rules("openai", "GET", "/v1/models/..;/x/../../admin", None)
            .expect_err("x");
        assert_eq!(e.kind, RefusalKind::Rules);
    }

    #[test]
    fn query_rules_rewrite_only_what_they_checked() {
        let l = layers(&[
            "[providers.openai]\nallow = [\"GET /v1/models?\", \"GET /v1/files?purpose=batch&limit=*\", \"GET /v1/x\"]\n",
        ]);
        let p = RunPolicy::compile(&l, |_| "default", None);
        let allowed = |path, query| p.check_rules("openai", "GET", path, query);
        assert_eq!(
            allowed("/v1/models", None).map(|a| a.map(|a| a.query)),
            Ok(Some(None))
        );
        let e = allowed("/v1/models", Some("sk-abc=1")).expect_err("no query allowed");
        assert!(
            e.message.contains("(its query has 1 parameter)") && !e.message.contains("sk-abc"),
            "the query is described, never quoted: {}",
            e.message
        );
        let e = allowed("/v1/files", Some("purpose=batch;admin=1")).expect_err("raw ;");
        assert!(e.message.contains("raw ';'"), "{}", e.message);
        assert_eq!(
            allowed("/v1/files", Some("purpose=b%61tch&&limit=1+2")).map(|a| a.map(|a| a.query)),
            Ok(Some(Some("purpose=batch&limit=1%202".into())))
        );
        assert_eq!(
            allowed("/v1/files", Some("purpose=batch&limit=2")).map(|a| a.map(|a| a.query)),
            Ok(Some(None)),
            "already canonical"
        );
        assert_eq!(
            allowed("/v1/x", Some("anything=%zz;")).map(|a| a.map(|a| a.query)),
            Ok(Some(None)),
            "a rule without '?' leaves the query alone"
        );
    }

    #[test]
    fn profile_tables_apply_to_their_profile_only() {
        let l = layers(&["[profiles.ci.providers.openai]\nallow = [\"GET /v1/models\"]\n"]);
        let ci = RunPolicy::compile(&l, |_| "ci", None);
        assert!(ci
            .check_rules("openai", "POST", "/v1/responses", None)
            .is_err());
        let other = RunPolicy::compile(&l, |_| "default", None);
        assert_eq!(
            other.check_rules("openai", "POST", "/v1/responses", None),
            Ok(None)
        );
    }

    #[test]
    fn budgets_and_body_sizes() {
        let l = layers(&[
            "[run]\nmax_requests = 3\n[providers.openai]\nrequests_per_minute = 2\nmax_body_bytes = 10\n",
        ]);
        let p = RunPolicy::compile(&l, |_| "default", None);
        let now = Instant::now();
        assert_eq!(
            p.charge("openai", Some(11), now).map_err(|r| r.kind),
            Err(RefusalKind::BodyTooLarge)
        );
        assert!(p.charge("openai", Some(10), now).is_ok());
        assert!(p.charge("openai", None, now).is_ok());
        let e = p
            .charge("openai", None, now)
            .expect_err("third in a minute");
        assert_eq!(e.kind, RefusalKind::Budget);
        assert!(e.message.contains("2 requests a minute"), "{}", e.message);
        assert!(p.charge("github", None, now).is_ok());
        let e = p.charge("github", None, now).expect_err("run total");
        assert!(
            e.message.contains("f0 [run]") && e.message.contains("3 requests in all"),
            "{}",
            e.message
        );
    }

    #[test]
    fn allow_flags_become_a_layer() {
        let spec = RunPolicySpec {
            allow_rules: vec!["openai:POST:/v1/responses".into()],
            ..RunPolicySpec::default()
        };
        let l = spec.layers(&Catalog::builtin()).expect("layers");
        let p = RunPolicy::compile(&l, |_| "default", None);
        assert!(p
            .check_rules("openai", "POST", "/v1/responses", None)
            .is_ok());
        let e = p
            .check_rules("openai", "GET", "/v1/models", None)
            .expect_err("not allowed");
        assert!(
            e.message.contains("--allow [providers.openai]"),
            "{}",
            e.message
        );
        let bad = RunPolicySpec {
            allow_rules: vec!["opnai:GET:/v1".into()],
            ..RunPolicySpec::default()
        };
        assert!(bad.layers(&Catalog::builtin()).is_err());
    }

    #[test]
    fn approvals_come_from_the_matching_rule_and_once_per_run_is_remembered() {
        let l = layers(&[r#"
[providers.openai]
allow = [
  "GET /v1/models",
  { rule = "DELETE /v1/files/*", approve = "each" },
  { rule = "POST /v1/files", approve = "once-per-run" },
]
approve_timeout = 5
"#]);
        let p = RunPolicy::compile(&l, |_| "default", None);
        let allowed = |m, path| {
            p.check_rules("openai", m, path, None)
                .expect("ok")
                .expect("rules")
        };
        assert_eq!(allowed("GET", "/v1/models").approval, None);
        let each = allowed("DELETE", "/v1/files/x").approval.expect("asks");
        assert!(each.each && each.timeout == Duration::from_secs(5));
        assert!(each.rule.contains("DELETE /v1/files/*") && each.rule.contains("f0"));
        let once = allowed("POST", "/v1/files").approval.expect("asks");
        assert!(p.needs_asking(&once));
        p.granted(&once);
        assert!(!p.needs_asking(&once), "asked once per run");
        p.granted(&each);
        assert!(p.needs_asking(&each), "asked each time");
        for bad in [
            "[providers.openai]\nallow = [{ rule = \"GET /v1\", approve = \"always\" }]\n",
            "[providers.openai]\nallow = [{ rule = \"GET /v1\", aprove = \"each\" }]\n",
            "[providers.openai]\napprove_timeout = 0\n",
            "[providers.openai]\napprove_timeout = 3601\n",
        ] {
            let e = file::parse(bad, "p.toml", &Catalog::builtin()).expect_err(bad);
            assert!(e.0.starts_with("p.toml:2:"), "{e}");
        }
    }

    #[test]
    fn bursts_are_audited_once() {
        let p = RunPolicy::default();
        let t = Instant::now();
        assert!(p.starts_burst(EventKind::PolicyDenied, "openai", t));
        assert!(!p.starts_burst(
            EventKind::PolicyDenied,
            "openai",
            t + Duration::from_secs(5)
        ));
        assert!(p.starts_burst(EventKind::PolicyDenied, "github", t));
        assert!(p.starts_burst(
            EventKind::PolicyDenied,
            "openai",
            t + Duration::from_secs(16)
        ));
    }
}
