//! Query-parameter rules: the part of a rule after `?` (`"GET /v1/models?"`,
//! `"GET /v1/files?purpose=fine-tune|batch&limit=*&after=*"`), and how a request's query is
//! read to match them.
//!
//! The definition (README, "Policy", says the same):
//! - A rule without `?` says nothing about the query: any query passes, untouched.
//! - A rule with `?` lists every parameter the request may carry: a request parameter whose
//!   name is not listed, or whose value is not one of the listed values (`*`: any value, the
//!   empty one included), fails the rule. `"GET /v1/models?"` allows no parameter at all. A
//!   listed parameter may also be absent (rules only allow).
//! - The request's query is split at `&` only; empty pieces (`&&`) are skipped. A raw `;` is
//!   refused (some servers split at it too: `purpose=x;admin=1`). Each piece is cut at its
//!   first `=` (none: the empty value); then name and value are decoded: `+` is a space,
//!   `%XX` the byte it encodes (`%26` is a `&` *inside* a value, `%3D` an `=` inside a name),
//!   a `%` not followed by two hex digits is refused. Names and values are compared as
//!   decoded bytes, exactly: case counts, order does not.
//! - Repeated parameters: every occurrence must be allowed, so whichever one a server reads
//!   (the first, the last, all) was checked.
//! - When a rule with `?` allowed the request, the query goes upstream re-encoded in one
//!   canonical form (each name and value percent-encoded but for `A-Z a-z 0-9 - . _ ~`, upper-
//!   case hex, in the request's order, `=` kept only where the request had one), so the upstream
//!   reads the parameters the broker checked and no others.
//! - In a rule, names and values are written the same way (percent-encode a `|`, `&`, `=`,
//!   `*` or `;` that is part of one: `%7C`, `%26`, `%3D`, `%2A`, `%3B`).

use std::borrow::Cow;
use std::cell::OnceCell;

/// What a rule's `?...` allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRule {
    params: Vec<(Vec<u8>, Values)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Values {
    Any,
    OneOf(Vec<Vec<u8>>),
}

/// One parameter of a request's query, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    pub name: Cow<'a, [u8]>,
    pub value: Cow<'a, [u8]>,
    /// Whether the request wrote an `=` (`?flag` and `?flag=` are both the empty value, but
    /// go upstream as they came).
    pub has_eq: bool,
}

/// Why a request's query cannot be read (so no rule with `?` can allow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Semicolon,
    BadEscape,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Semicolon => {
                "its query holds a raw ';' (some servers split parameters at it): encode it as %3B"
            }
            Refused::BadEscape => "its query holds a '%' that is not a percent-escape",
        }
    }
}

impl QueryRule {
    /// The part of a rule after `?`.
    pub fn parse(spec: &str) -> Result<QueryRule, String> {
        if spec.is_empty() {
            return Ok(QueryRule { params: Vec::new() });
        }
        if spec.contains(';') {
            return Err(format!(
                "'?{spec}': a ';' in a query rule is not a separator: parameters are joined by '&' (write a ';' in a name or value as %3B)"
            ));
        }
        let mut params: Vec<(Vec<u8>, Values)> = Vec::new();
        for piece in spec.split('&') {
            let Some((name, values)) = piece.split_once('=') else {
                return Err(format!(
                    "'?{spec}': '{piece}' is not NAME=VALUES (e.g. 'limit=*', 'purpose=batch|fine-tune', 'flag=' for the empty value)"
                ));
            };
            let name = decode(name).map_err(|_| bad_escape(spec))?.into_owned();
            if name.is_empty() || name == b"*" {
                return Err(format!(
                    "'?{spec}': a parameter needs a name (there is no wildcard for names: list each one)"
                ));
            }
            if params.iter().any(|(n, _)| *n == name) {
                return Err(format!(
                    "'?{spec}': '{}' is listed twice: give its values once, joined by '|'",
                    String::from_utf8_lossy(&name)
                ));
            }
            let values = if values == "*" {
                Values::Any
            } else {
                let mut list = Vec::new();
                for value in values.split('|') {
                    if value == "*" {
                        return Err(format!(
                            "'?{spec}': '*' stands for any value on its own ('{}=*'), not among others",
                            String::from_utf8_lossy(&name)
                        ));
                    }
                    list.push(decode(value).map_err(|_| bad_escape(spec))?.into_owned());
                }
                Values::OneOf(list)
            };
            params.push((name, values));
        }
        Ok(QueryRule { params })
    }

    /// Does this rule allow every one of `params`?
    pub fn allows(&self, params: &[Param<'_>]) -> bool {
        params.iter().all(|p| {
            self.params
                .iter()
                .find(|(name, _)| *name == *p.name)
                .is_some_and(|(_, values)| match values {
                    Values::Any => true,
                    Values::OneOf(list) => list.iter().any(|v| *v == *p.value),
                })
        })
    }
}

fn bad_escape(spec: &str) -> String {
    format!("'?{spec}': a '%' that is not a percent-escape")
}

/// A request's query, read once, the first time a rule with `?` asks for it.
#[derive(Debug)]
pub struct RequestQuery<'a> {
    raw: Option<&'a str>,
    parsed: OnceCell<Result<Vec<Param<'a>>, Refused>>,
}

impl<'a> RequestQuery<'a> {
    pub fn new(raw: Option<&'a str>) -> RequestQuery<'a> {
        RequestQuery {
            raw,
            parsed: OnceCell::new(),
        }
    }

    pub fn params(&self) -> Result<&[Param<'a>], Refused> {
        self.parsed
            .get_or_init(|| parse(self.raw.unwrap_or("")))
            .as_deref()
            .map_err(|e| *e)
    }

    /// How many parameters it has (for messages, which never quote a query: it is the
    /// agent's, and may hold anything).
    pub fn describe(&self) -> Option<String> {
        match self.params() {
            Err(why) => Some(why.reason().to_string()),
            Ok([]) => None,
            Ok([_]) => Some("its query has 1 parameter".into()),
            Ok(p) => Some(format!("its query has {} parameters", p.len())),
        }
    }

    /// The canonical form to send upstream, when it differs from the request's.
    pub fn rewritten(&self) -> Option<String> {
        let params = self.params().ok()?;
        let canonical = canonical(params);
        (Some(canonical.as_str()) != self.raw && !(canonical.is_empty() && self.raw.is_none()))
            .then_some(canonical)
    }
}

/// Read a request's query (without its `?`) as the definition says.
pub fn parse(query: &str) -> Result<Vec<Param<'_>>, Refused> {
    if query.contains(';') {
        return Err(Refused::Semicolon);
    }
    let mut params = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value, has_eq) = match piece.split_once('=') {
            Some((n, v)) => (n, v, true),
            None => (piece, "", false),
        };
        params.push(Param {
            name: decode(name)?,
            value: decode(value)?,
            has_eq,
        });
    }
    Ok(params)
}

/// `+` as a space, `%XX` as its byte; borrowed when there is neither.
fn decode(text: &str) -> Result<Cow<'_, [u8]>, Refused> {
    let bytes = text.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b'%' | b'+')) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(Refused::BadEscape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| Refused::BadEscape)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Refused::BadEscape);
                }
                out.push(u8::from_str_radix(hex, 16).map_err(|_| Refused::BadEscape)?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Ok(Cow::Owned(out))
}

/// The canonical query: see the module docs.
pub fn canonical(params: &[Param<'_>]) -> String {
    let mut out = String::new();
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        crate::form::encode_into(&p.name, false, &mut out);
        if p.has_eq {
            out.push('=');
            crate::form::encode_into(&p.value, false, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rule: &str, query: Option<&str>) -> Result<bool, Refused> {
        let rule = QueryRule::parse(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        let q = RequestQuery::new(query);
        Ok(rule.allows(q.params()?))
    }

    /// Each request query against each rule, including the bypass attempts: what is allowed,
    /// what is not, and what cannot be read at all.
    #[test]
    fn the_definition_case_by_case() {
        let files = "purpose=batch|fine-tune&limit=*";
        let table: &[(&str, Option<&str>, Result<bool, Refused>)] = &[
            // No parameter at all.
            ("", None, Ok(true)),
            ("", Some(""), Ok(true)),
            ("", Some("&&"), Ok(true)),
            ("", Some("x=1"), Ok(false)),
            ("", Some("x"), Ok(false)),
            ("", Some("="), Ok(false)),
            // Listed names, listed values.
            (files, None, Ok(true)),
            (files, Some("purpose=batch"), Ok(true)),
            (files, Some("purpose=fine-tune&limit=10"), Ok(true)),
            (files, Some("limit=10&purpose=batch"), Ok(true)),
            (files, Some("limit="), Ok(true)),
            (files, Some("limit"), Ok(true)),
            (files, Some("purpose=assistants"), Ok(false)),
            (files, Some("purpose="), Ok(false)),
            (files, Some("purpose=Batch"), Ok(false)),
            (files, Some("Purpose=batch"), Ok(false)),
            (files, Some("purpose=batch&admin=1"), Ok(false)),
            // Decoded before comparing: escapes and '+' are what they encode.
            (files, Some("%70urpose=b%61tch"), Ok(true)),
            (files, Some("purpose=fine%2Dtune"), Ok(true)),
            (files, Some("purpose=fine%2dtune"), Ok(true)),
            // Encoded separators are data, not separators.
            (files, Some("purpose=batch%26admin%3D1"), Ok(false)),
            (files, Some("limit=1%26admin%3D1"), Ok(true)),
            (files, Some("purpose%3Dbatch"), Ok(false)),
            (files, Some("purpose%3Dbatch=x"), Ok(false)),
            // A raw ';' is refused; an encoded one is a byte of a value.
            (
                files,
                Some("purpose=batch;admin=1"),
                Err(Refused::Semicolon),
            ),
            (files, Some("limit=1;admin=1"), Err(Refused::Semicolon)),
            (files, Some("limit=1%3Badmin=1"), Ok(true)),
            (files, Some("purpose=batch%3Badmin=1"), Ok(false)),
            // Repeated: each occurrence must be allowed, whichever one a server reads.
            (files, Some("purpose=batch&purpose=fine-tune"), Ok(true)),
            (files, Some("purpose=batch&purpose=assistants"), Ok(false)),
            (files, Some("purpose=assistants&purpose=batch"), Ok(false)),
            // Double encoding is decoded once: '%2561' is '%61', not 'a'.
            ("a=a", Some("a=%2561"), Ok(false)),
            ("a=a", Some("%2561=a"), Ok(false)),
            // Malformed escapes.
            (files, Some("limit=%zz"), Err(Refused::BadEscape)),
            (files, Some("limit=%2"), Err(Refused::BadEscape)),
            (files, Some("lim%it=1"), Err(Refused::BadEscape)),
            // '+' is a space, in requests and in rules.
            ("q=a+b", Some("q=a%20b"), Ok(true)),
            ("q=a%20b", Some("q=a+b"), Ok(true)),
            ("q=a+b", Some("q=a%2Bb"), Ok(false)),
            // Values in rules may be encoded.
            ("sep=a%7Cb|c", Some("sep=a|b"), Ok(true)),
            ("sep=a%7Cb|c", Some("sep=c"), Ok(true)),
            ("sep=a%7Cb|c", Some("sep=a"), Ok(false)),
            ("flag=", Some("flag"), Ok(true)),
            ("flag=", Some("flag=1"), Ok(false)),
        ];
        for (rule, query, want) in table {
            assert_eq!(allows(rule, *query), *want, "?{rule} against {query:?}");
        }
    }

    #[test]
    fn mistakes_in_rules_are_errors() {
        for bad in [
            "limit", "=x", "*=*", "a=1&a=2", "a=x|*", "a=%zz", "a=1;b=2", "a=1&",
        ] {
            assert!(QueryRule::parse(bad).is_err(), "?{bad} was taken");
        }
    }

    #[test]
    fn canonical_form_is_sent_only_when_it_differs() {
        let rewritten = |q: Option<&str>| RequestQuery::new(q).rewritten();
        assert_eq!(rewritten(None), None);
        assert_eq!(rewritten(Some("limit=10&after=file-1")), None);
        assert_eq!(rewritten(Some("flag&x=")), None);
        assert_eq!(rewritten(Some("")), None);
        assert_eq!(rewritten(Some("&")).as_deref(), Some(""));
        assert_eq!(rewritten(Some("a=1&&b=2")).as_deref(), Some("a=1&b=2"));
        assert_eq!(
            rewritten(Some("q=a+b%2bc%7e&%70=%3d")).as_deref(),
            Some("q=a%20b%2Bc~&p=%3D")
        );
        assert_eq!(
            rewritten(Some("x=1%26admin%3D1")).as_deref(),
            None,
            "already canonical"
        );
        assert_eq!(rewritten(Some("a;b")), None, "unreadable: never rewritten");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("&".to_string()),
                Just("=".to_string()),
                Just("+".to_string()),
                Just("%26".to_string()),
                Just("%3D".to_string()),
                Just("%3b".to_string()),
                Just("%25".to_string()),
                Just("%2B".to_string()),
                Just("%41".to_string()),
                Just("%ff".to_string()),
                "[a-zA-Z0-9_~.|*-]{1,4}",
            ]
        }

        proptest! {
            /// The canonical form reads as the same parameters, and is its own canonical form
            /// (so what the upstream gets is what was checked).
            #[test]
            fn canonical_reads_the_same(p in proptest::collection::vec(piece(), 0..12)) {
                let query = p.concat();
                if let Ok(params) = parse(&query) {
                    let canon = canonical(&params);
                    let again = parse(&canon).expect("canonical parses");
                    prop_assert_eq!(&again, &params);
                    prop_assert_eq!(canonical(&again), canon);
                }
            }

            /// Nothing panics, in requests or in rules.
            #[test]
            fn any_text_parses_or_is_refused(q in ".{0,40}") {
                let _ = parse(&q);
                let _ = QueryRule::parse(&q);
            }
        }
    }
}
