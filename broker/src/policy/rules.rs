//! One method/path rule: `"POST /v1/responses"`, `"GET|HEAD /v1/files/*"`, `"* /v1/**"`, and
//! optionally what query it allows after a `?` (`"GET /v1/models?"`: none; see `query`).
//!
//! Methods are upper case (`GET`), several joined by `|`, or `*` for any. The path pattern is
//! matched segment by segment against the normalised path (`path`): a literal segment matches
//! itself only (case-sensitive), `*` matches exactly one non-empty segment, and `**` (last only)
//! matches what is left, nothing included. A pattern is written in normal form; one that is not
//! (`/v1/../x`, `/v1/%2e`) is an error rather than a rule that could never match.

use std::fmt;

use super::query::{QueryRule, RequestQuery};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Whether a request this rule allows waits for `broker approve`.
    pub approve: Approve,
    methods: Option<Vec<String>>,
    segments: Vec<Segment>,
    /// `None`: the rule says nothing about the query (written without `?`).
    query: Option<QueryRule>,
    /// As written, for messages.
    text: String,
}

/// `approve = "once-per-run" | "each"` on a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Approve {
    #[default]
    No,
    /// The first request the rule allows in a run waits for approval; the rest of the run's
    /// requests under it do not.
    OncePerRun,
    /// Every request the rule allows waits for approval.
    Each,
}

impl Approve {
    pub fn parse(text: &str) -> Result<Approve, String> {
        match text {
            "once-per-run" => Ok(Approve::OncePerRun),
            "each" => Ok(Approve::Each),
            other => Err(format!(
                "'{other}' is not an approval: \"once-per-run\" or \"each\""
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl Rule {
    /// `METHODS PATH`, as in a policy file.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let (methods, pattern) = text
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("'{text}' is not 'METHOD /path' (e.g. 'POST /v1/responses')"))?;
        Rule::from_parts(methods, pattern.trim(), text.trim())
    }

    /// `PROVIDER:METHODS:PATH[:approve=each|once-per-run]`, as given to `--allow`: the
    /// provider and the rule.
    pub fn parse_flag(text: &str) -> Result<(String, Rule), String> {
        let (rule_text, approve) = match text.rsplit_once(":approve=") {
            Some((rule, how)) => (
                rule,
                Approve::parse(how).map_err(|why| format!("--allow '{text}': {why}"))?,
            ),
            None => (text, Approve::No),
        };
        let mut parts = rule_text.splitn(3, ':');
        let (Some(provider), Some(methods), Some(pattern)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "--allow '{text}': expected PROVIDER or PROVIDER:METHOD:/path[:approve=each|once-per-run] (e.g. openai:POST:/v1/responses)"
            ));
        };
        let mut rule = Rule::from_parts(methods, pattern, &format!("{methods} {pattern}"))
            .map_err(|why| format!("--allow '{text}': {why}"))?;
        rule.approve = approve;
        Ok((provider.to_string(), rule))
    }

    fn from_parts(methods: &str, pattern: &str, text: &str) -> Result<Rule, String> {
        let methods = match methods {
            "*" => None,
            list => {
                let mut out = Vec::new();
                for method in list.split('|') {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                        return Err(format!(
                            "'{method}' is not a method: methods are upper case (GET, POST, ...), joined by '|', or '*' for any"
                        ));
                    }
                    out.push(method.to_string());
                }
                Some(out)
            }
        };
        let (pattern, query) = match pattern.split_once('?') {
            Some((path, spec)) => (path, Some(QueryRule::parse(spec)?)),
            None => (pattern, None),
        };
        if !pattern.starts_with('/') {
            return Err(format!("the path '{pattern}' must start with '/'"));
        }
        let body = &pattern[1..];
        let mut segments = Vec::new();
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("'{pattern}': '**' may only be the last segment")),
                "" if i + 1 == parts.len() => Segment::Literal(String::new()),
                literal if literal.contains('*') => {
                    return Err(format!(
                    "'{pattern}': '*' stands for a whole segment ('/v1/files/*'), not part of one"
                ))
                }
                literal => Segment::Literal(literal.to_string()),
            };
            segments.push(segment);
        }
        // The literal parts must already be in normal form: a rule for a path the broker would
        // never let through as written is a mistake.
        let literal: String = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => format!("/{l}"),
                _ => "/x".to_string(),
            })
            .collect::<String>();
        let literal = if literal.is_empty() {
            "/".to_string()
        } else {
            literal
        };
        match super::path::normalize(&literal, true) {
            Ok(normal) if normal == literal => {}
            Ok(normal) => {
                return Err(format!(
                    "'{pattern}' is not in normal form (it reads as '{normal}'): write the path as the broker normalises it"
                ))
            }
            Err(why) => return Err(format!("'{pattern}': {}", why.reason())),
        }
        Ok(Rule {
            approve: Approve::No,
            methods,
            segments,
            query,
            text: text.to_string(),
        })
    }

    /// Does this rule say anything about the query (was it written with `?`)?
    pub fn constrains_query(&self) -> bool {
        self.query.is_some()
    }

    /// Does this rule allow `method` on the normalised `path` with `query`?
    pub fn allows(&self, method: &str, path: &str, query: &RequestQuery<'_>) -> bool {
        self.allows_path(method, path)
            && self
                .query
                .as_ref()
                .is_none_or(|rule| query.params().is_ok_and(|params| rule.allows(params)))
    }

    fn allows_path(&self, method: &str, path: &str) -> bool {
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m == method) {
                return false;
            }
        }
        let mut parts = path[1.min(path.len())..].split('/');
        // "/" is one empty segment to `split`; a pattern "/" has none.
        if path == "/" {
            return self.segments.is_empty() || self.segments == [Segment::Rest];
        }
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p == l => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn methods_and_segments_match_exactly() {
        let r = rule("POST /v1/responses");
        assert!(r.allows_path("POST", "/v1/responses"));
        assert!(!r.allows_path("GET", "/v1/responses"));
        assert!(!r.allows_path("post", "/v1/responses"));
        assert!(!r.allows_path("POST", "/v1/responses/x"));
        assert!(!r.allows_path("POST", "/v1/responses/"));
        assert!(!r.allows_path("POST", "/v1/Responses"));
        assert!(!r.allows_path("POST", "/v1"));

        let r = rule("GET|HEAD /v1/files/*");
        assert!(r.allows_path("HEAD", "/v1/files/abc"));
        assert!(!r.allows_path("GET", "/v1/files/"));
        assert!(!r.allows_path("GET", "/v1/files/a/b"));
        assert!(!r.allows_path("DELETE", "/v1/files/abc"));

        let r = rule("* /v1/**");
        assert!(r.allows_path("DELETE", "/v1"));
        assert!(r.allows_path("GET", "/v1/"));
        assert!(r.allows_path("GET", "/v1/a/b/c"));
        assert!(!r.allows_path("GET", "/v2/a"));
        assert!(!r.allows_path("GET", "/v1x"));

        assert!(rule("GET /").allows_path("GET", "/"));
        assert!(!rule("GET /").allows_path("GET", "/x"));
        assert!(rule("GET /**").allows_path("GET", "/"));
        assert!(rule("GET /v1/models/").allows_path("GET", "/v1/models/"));
    }

    #[test]
    fn mistakes_are_errors_not_rules() {
        for bad in [
            "get /v1",
            "GET v1/models",
            "GET",
            "GET /v1/../admin",
            "GET /v1/./x",
            "GET /v1//x",
            "GET /v1/%2e%2e",
            "GET /v1/x;y",
            "GET /v1/**/x",
            "GET /v1/file-*",
            "GET /v1/admin.",
            "GET|  /v1",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} was taken");
        }
        let (provider, r) = Rule::parse_flag("openai:POST:/v1/responses").expect("flag");
        assert_eq!(provider, "openai");
        assert!(r.allows_path("POST", "/v1/responses"));
        assert!(Rule::parse_flag("openai:POST").is_err());
        assert!(Rule::parse_flag("openai:post:/v1").is_err());
    }

    #[test]
    fn flags_may_ask_for_approval_and_constrain_the_query() {
        let (provider, r) =
            Rule::parse_flag("openai:DELETE:/v1/files/*:approve=each").expect("flag");
        assert_eq!((provider.as_str(), r.approve), ("openai", Approve::Each));
        assert!(r.allows_path("DELETE", "/v1/files/x"));
        let (_, r) = Rule::parse_flag("openai:POST:/v1/files:approve=once-per-run").expect("flag");
        assert_eq!(r.approve, Approve::OncePerRun);
        let (_, r) = Rule::parse_flag("gemini:POST:/v1beta/models/*").expect("flag");
        assert_eq!(r.approve, Approve::No);
        let e = Rule::parse_flag("openai:POST:/v1/files:approve=always").expect_err("bad");
        assert!(e.contains("once-per-run"), "{e}");
        let (_, r) =
            Rule::parse_flag("openai:GET:/v1/files?purpose=batch:approve=each").expect("flag");
        assert_eq!(r.approve, Approve::Each);
        assert!(r.allows(
            "GET",
            "/v1/files",
            &RequestQuery::new(Some("purpose=batch"))
        ));
        assert!(!r.allows("GET", "/v1/files", &RequestQuery::new(Some("purpose=x"))));
    }

    #[test]
    fn query_rules_apply_after_the_path() {
        let q = RequestQuery::new;
        let none = rule("GET /v1/models?");
        assert!(none.constrains_query());
        assert!(none.allows("GET", "/v1/models", &q(None)));
        assert!(!none.allows("GET", "/v1/models", &q(Some("limit=1"))));
        let any = rule("GET /v1/models");
        assert!(!any.constrains_query());
        assert!(any.allows("GET", "/v1/models", &q(Some("x;y=%zz"))));
        let files = rule("GET /v1/files/*?purpose=batch|fine-tune&limit=*");
        assert!(files.allows("GET", "/v1/files/f", &q(Some("limit=2&purpose=batch"))));
        assert!(!files.allows("GET", "/v1/files/f", &q(Some("purpose=batch;x=1"))));
        assert!(!files.allows("GET", "/v1/files", &q(Some("purpose=batch"))));
        assert_eq!(
            files.to_string(),
            "GET /v1/files/*?purpose=batch|fine-tune&limit=*"
        );
        for bad in [
            "GET /v1/models?limit",
            "GET /v1/models?a=1;b=2",
            "GET /v1/../x?a=*",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} was taken");
        }
    }
}
