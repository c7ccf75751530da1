//! The swap: find the provider's placeholder at the places its route names (an
//! `Authorization` scheme, a provider header, a query parameter) and put the real credential
//! there. Pure functions over request parts, so they are tested without any I/O.
//!
//! Rules that keep the promise:
//! - only the injection points of the route the request is classified to are ever touched;
//! - a value that is not exactly the placeholder is left alone: the broker never overwrites a
//!   credential it did not place. One that looks like a real key of the provider (its
//!   `key_pattern`) is refused by the handler instead ([`carries_real_key`]): an agent should
//!   never hold one;
//! - `inject = "always"` adds the credential only where the request carries none.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use http::header::{Entry, HeaderName};
use http::{HeaderMap, HeaderValue, Uri};
use zeroize::Zeroizing;

use crate::providers::{Catalog, InjectMode, Injection, Provider, Route, Scheme};

/// What a request carries, before any credential is looked up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// The route's own placeholder is present at one of its injection points.
    pub own_placeholder: bool,
    /// Names of other providers whose placeholder appears anywhere in the request head.
    pub foreign: Vec<String>,
}

impl Findings {
    /// Does this request need the real credential?
    pub fn needs_credential(&self, route: &Route, headers: &HeaderMap) -> bool {
        self.own_placeholder
            || (route.inject == InjectMode::Always && first_point_is_empty(route, headers))
    }
}

/// Inspect the request head for placeholders.
pub fn inspect(
    catalog: &Catalog,
    provider: &Provider,
    route: &Route,
    headers: &HeaderMap,
    uri: &Uri,
) -> Findings {
    let mut findings = Findings {
        own_placeholder: route
            .credential
            .iter()
            .any(|point| point_holds_placeholder(point, &provider.placeholder, headers, uri)),
        foreign: Vec::new(),
    };
    // Everything a placeholder could hide in: header values, the user:password of Basic
    // credentials, the query. Each is searched once for every provider's placeholder.
    let mut found = Vec::new();
    for value in headers.values() {
        if let Some(HeaderCredential::Basic { user, pass }) =
            header_credential(value, Some(&Scheme::Basic { username: None }))
        {
            catalog.placeholders_in(format!("{user}:{pass}").as_bytes(), &mut found);
        }
        catalog.placeholders_in(value.as_bytes(), &mut found);
    }
    catalog.placeholders_in(uri.query().unwrap_or("").as_bytes(), &mut found);
    found.sort_unstable();
    found.dedup();
    findings.foreign = found
        .into_iter()
        .map(|i| &catalog.providers()[i])
        .filter(|other| other.name != provider.name)
        .map(|other| other.name.clone())
        .collect();
    findings
}

/// Does the request carry, at one of the route's injection points, a value that is not the
/// placeholder but matches the provider's key pattern (a real key the agent got hold of)?
/// Values equal to the placeholder are skipped before the pattern is tried, so a request that
/// carries the placeholder costs one comparison per point.
pub fn carries_real_key(
    provider: &Provider,
    route: &Route,
    headers: &HeaderMap,
    uri: &Uri,
) -> bool {
    let real = |value: &str| value != provider.placeholder && provider.key_matches(value);
    route.credential.iter().any(|point| match point {
        Injection::Header { name, scheme } => headers.get_all(name.as_str()).iter().any(|v| {
            match header_credential(v, scheme.as_ref()) {
                Some(HeaderCredential::Plain { token, .. }) => real(token),
                Some(HeaderCredential::Basic { user, pass }) => real(&user) || real(&pass),
                None => false,
            }
        }),
        Injection::Query { param } => query_values(uri, param).any(|v| real(&v)),
    })
}

/// Put `secret` where the placeholder is (or, for `inject = "always"`, at the first injection
/// point when the request carries no credential there). Returns whether anything changed.
pub fn apply(
    provider: &Provider,
    route: &Route,
    headers: &mut HeaderMap,
    uri: &mut Uri,
    secret: &str,
) -> Result<bool, SwapError> {
    let mut swapped = false;
    for point in &route.credential {
        swapped |= swap_point(point, &provider.placeholder, headers, uri, secret)?;
    }
    if !swapped && route.inject == InjectMode::Always && first_point_is_empty(route, headers) {
        if let Some(point) = route.credential.first() {
            inject_point(point, headers, uri, secret)?;
            swapped = true;
        }
    }
    Ok(swapped)
}

/// Replace a credential the broker itself put on a request (`old`) with a fresh one, at the
/// same injection points: the retry after an upstream rejected a token that was then refreshed.
pub fn replace(
    route: &Route,
    headers: &mut HeaderMap,
    uri: &mut Uri,
    old: &str,
    new: &str,
) -> Result<bool, SwapError> {
    let mut replaced = false;
    for point in &route.credential {
        replaced |= swap_point(point, old, headers, uri, new)?;
    }
    Ok(replaced)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwapError {
    /// The stored credential cannot be put in a header (a newline, a non-visible byte).
    #[error("the stored credential contains characters that cannot be sent in an HTTP header; re-add it")]
    BadCredential,
    #[error("the request URI cannot be rebuilt after the swap")]
    BadUri,
}

fn point_holds_placeholder(
    point: &Injection,
    placeholder: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> bool {
    match point {
        Injection::Header { name, scheme } => headers
            .get_all(name.as_str())
            .iter()
            .any(|v| header_credential(v, scheme.as_ref()).is_some_and(|c| c.holds(placeholder))),
        Injection::Query { param } => query_values(uri, param).any(|v| v == placeholder),
    }
}

/// Whether the route's first injection point is absent from the request (for `always`).
fn first_point_is_empty(route: &Route, headers: &HeaderMap) -> bool {
    match route.credential.first() {
        Some(Injection::Header { name, .. }) => !headers.contains_key(name.as_str()),
        // Query injection for `always` is only done when the parameter is absent; that is
        // checked in `inject_point`.
        Some(Injection::Query { .. }) => true,
        None => false,
    }
}

fn swap_point(
    point: &Injection,
    placeholder: &str,
    headers: &mut HeaderMap,
    uri: &mut Uri,
    secret: &str,
) -> Result<bool, SwapError> {
    match point {
        Injection::Header { name, scheme } => {
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                return Ok(false);
            };
            let Entry::Occupied(mut values) = headers.entry(header) else {
                return Ok(false);
            };
            // In place: the values keep their order among themselves and among the headers.
            let mut changed = false;
            for value in values.iter_mut() {
                let swapped = match header_credential(value, scheme.as_ref()) {
                    Some(cred) if cred.holds(placeholder) => {
                        cred.with_secret(placeholder, secret)?
                    }
                    _ => continue,
                };
                *value = swapped;
                changed = true;
            }
            Ok(changed)
        }
        Injection::Query { param } => {
            let Some(query) = uri.query() else {
                return Ok(false);
            };
            let mut changed = false;
            let rebuilt: Vec<String> = query
                .split('&')
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if k == param && crate::form::decode(v) == placeholder {
                        changed = true;
                        format!("{k}={}", crate::form::encode(secret))
                    } else {
                        pair.to_string()
                    }
                })
                .collect();
            if changed {
                *uri = with_query(uri, &rebuilt.join("&"))?;
            }
            Ok(changed)
        }
    }
}

fn inject_point(
    point: &Injection,
    headers: &mut HeaderMap,
    uri: &mut Uri,
    secret: &str,
) -> Result<(), SwapError> {
    match point {
        Injection::Header { name, scheme } => {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| SwapError::BadUri)?;
            let value = match scheme {
                None => Zeroizing::new(secret.to_string()),
                Some(Scheme::Bearer) => Zeroizing::new(format!("Bearer {secret}")),
                Some(Scheme::Token) => Zeroizing::new(format!("token {secret}")),
                Some(Scheme::Basic { username }) => {
                    let user = username.as_deref().unwrap_or("");
                    let pair = Zeroizing::new(format!("{user}:{secret}"));
                    Zeroizing::new(format!("Basic {}", BASE64.encode(pair.as_bytes())))
                }
            };
            headers.insert(header, sensitive_value(&value)?);
            Ok(())
        }
        Injection::Query { param } => {
            if query_values(uri, param).next().is_some() {
                return Ok(());
            }
            let pair = format!("{param}={}", crate::form::encode(secret));
            let query = match uri.query() {
                Some(q) if !q.is_empty() => format!("{q}&{pair}"),
                _ => pair,
            };
            *uri = with_query(uri, &query)?;
            Ok(())
        }
    }
}

/// A credential as found in one header value, per the route's scheme. Borrowed where it can be:
/// every request is inspected.
enum HeaderCredential<'a> {
    /// The whole value (`x-api-key: <v>`), or the token after a scheme word.
    Plain { prefix: &'a str, token: &'a str },
    /// `Basic base64(user:pass)`.
    Basic { user: String, pass: String },
}

impl HeaderCredential<'_> {
    fn holds(&self, placeholder: &str) -> bool {
        match self {
            HeaderCredential::Plain { token, .. } => *token == placeholder,
            HeaderCredential::Basic { user, pass } => pass == placeholder || user == placeholder,
        }
    }

    fn with_secret(&self, placeholder: &str, secret: &str) -> Result<HeaderValue, SwapError> {
        match self {
            HeaderCredential::Plain { prefix, .. } => {
                sensitive_value(&Zeroizing::new([*prefix, secret].concat()))
            }
            HeaderCredential::Basic { user, pass } => {
                let user = if user == placeholder {
                    secret
                } else {
                    user.as_str()
                };
                let pass = if pass == placeholder {
                    secret
                } else {
                    pass.as_str()
                };
                let pair = Zeroizing::new(format!("{user}:{pass}"));
                sensitive_value(&Zeroizing::new(format!(
                    "Basic {}",
                    BASE64.encode(pair.as_bytes())
                )))
            }
        }
    }
}

fn header_credential<'a>(
    value: &'a HeaderValue,
    scheme: Option<&Scheme>,
) -> Option<HeaderCredential<'a>> {
    match scheme {
        // `to_str` holds visible ASCII and tabs only, so trimming ASCII whitespace is all of
        // `str::trim`'s, and cheaper.
        None => Some(HeaderCredential::Plain {
            prefix: "",
            token: value.to_str().ok()?.trim_ascii(),
        }),
        Some(Scheme::Bearer) => scheme_token(value.to_str().ok()?, "bearer"),
        Some(Scheme::Token) => scheme_token(value.to_str().ok()?, "token"),
        Some(Scheme::Basic { .. }) => {
            // On bytes: `inspect` asks this of every header value of every request, and
            // almost none is Basic. Bytes that are not base64 fail to decode below.
            let text = value.as_bytes().trim_ascii();
            let word = text.get(..6)?;
            if !word.eq_ignore_ascii_case(b"basic ") {
                return None;
            }
            let decoded = BASE64.decode(text[6..].trim_ascii()).ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            let (user, pass) = decoded.split_once(':')?;
            Some(HeaderCredential::Basic {
                user: user.to_string(),
                pass: pass.to_string(),
            })
        }
    }
}

/// `<Scheme> <token>` with the scheme word matched case-insensitively; the prefix keeps the
/// agent's own spelling of the scheme. `text` is a header value's (`HeaderValue::to_str`:
/// visible ASCII and tabs). On bytes: three of these run per request, and `str`'s trim and
/// split cost about 370 instructions each.
fn scheme_token<'a>(text: &'a str, scheme: &str) -> Option<HeaderCredential<'a>> {
    let trimmed = text.trim_ascii();
    // The word before the first space is the scheme: the scheme's bytes (which hold no
    // space), then a space.
    let n = scheme.len();
    let word = trimmed.as_bytes().get(..n)?;
    if trimmed.as_bytes().get(n) != Some(&b' ') || !word.eq_ignore_ascii_case(scheme.as_bytes()) {
        return None;
    }
    Some(HeaderCredential::Plain {
        // The scheme word and the space after it, as the agent spelled them.
        prefix: &trimmed[..n + 1],
        token: trimmed[n + 1..].trim_ascii(),
    })
}

/// A header value holding a secret: validated and marked sensitive so hyper's HPACK encoder
/// never indexes it and debug output hides it.
fn sensitive_value(text: &str) -> Result<HeaderValue, SwapError> {
    let mut value = HeaderValue::from_str(text).map_err(|_| SwapError::BadCredential)?;
    value.set_sensitive(true);
    Ok(value)
}

fn query_values<'a>(uri: &'a Uri, param: &'a str) -> impl Iterator<Item = String> + 'a {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == param).then(|| crate::form::decode(v))
        })
}

fn with_query(uri: &Uri, query: &str) -> Result<Uri, SwapError> {
    let mut parts = uri.clone().into_parts();
    let path = parts
        .path_and_query
        .as_ref()
        .map(|pq| pq.path())
        .unwrap_or("/");
    parts.path_and_query = Some(
        format!("{path}?{query}")
            .parse()
            .map_err(|_| SwapError::BadUri)?,
    );
    Uri::from_parts(parts).map_err(|_| SwapError::BadUri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{HostSpec, InjectMode};

    const PH: &str = "ph-broker-placeholder-test";
    const SECRET: &str = "real-secret-value-123";

    fn provider(route: Route) -> Provider {
        let mut p = Catalog::builtin().get("openai").expect("openai").clone();
        p.name = "testprov".into();
        p.placeholder = PH.into();
        p.routes = vec![route];
        p
    }

    fn route(credential: Vec<Injection>, inject: InjectMode) -> Route {
        Route::new(
            vec![HostSpec {
                pattern: "api.test".into(),
                port: 443,
                path_prefix: None,
            }],
            credential,
            inject,
        )
    }

    /// `scheme_token` as it was written on `str` (trim, split at the first space).
    fn scheme_token_on_str<'a>(text: &'a str, scheme: &str) -> Option<(&'a str, &'a str)> {
        let trimmed = text.trim();
        let (word, rest) = trimmed.split_once(' ')?;
        word.eq_ignore_ascii_case(scheme)
            .then(|| (&trimmed[..word.len() + 1], rest.trim()))
    }

    #[test]
    fn the_scheme_and_token_are_read_on_bytes_as_on_str() {
        // Header values as `to_str` passes them: visible ASCII, spaces and tabs.
        let pieces = [
            "Bearer", "bearer", "BEARER", "Bearerx", "token", "Token", " ", "  ", "\t", "sk-1",
            "a", "=", "Basic",
        ];
        let mut rng = crate::test_rng::Rng::new(31);
        let mut matched = 0;
        for round in 0..20_000 {
            let text = rng.text(&pieces, 6);
            for scheme in ["bearer", "token"] {
                let got = match scheme_token(&text, scheme) {
                    Some(HeaderCredential::Plain { prefix, token }) => Some((prefix, token)),
                    _ => None,
                };
                assert_eq!(
                    got,
                    scheme_token_on_str(&text, scheme),
                    "round {round}: {text:?}"
                );
                matched += usize::from(got.is_some());
            }
            assert_eq!(text.trim_ascii(), text.trim(), "round {round}: {text:?}");
        }
        assert!(matched > 300, "{matched}");
    }

    fn header(name: &str, scheme: Option<Scheme>) -> Injection {
        Injection::Header {
            name: name.into(),
            scheme,
        }
    }

    fn swap(route: Route, headers: &[(&str, &str)], uri: &str) -> (bool, HeaderMap, Uri) {
        let p = provider(route.clone());
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let mut uri: Uri = uri.parse().expect("uri");
        let changed = apply(&p, &route, &mut map, &mut uri, SECRET).expect("apply");
        (changed, map, uri)
    }

    #[test]
    fn real_keys_at_injection_points_are_recognised() {
        let p = Catalog::builtin().get("openai").expect("openai").clone();
        let route = p.routes[0].clone();
        let check = |headers: &[(&str, &str)], uri: &str| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    v.parse().expect("value"),
                );
            }
            carries_real_key(&p, &route, &map, &uri.parse().expect("uri"))
        };
        // Built at run time: no key-shaped literal in the repository.
        let real = ["sk-", "realLooking", "Key0123456789abcdef"].concat();
        assert!(check(
            &[("authorization", &format!("Bearer {real}"))],
            "/v1/models"
        ));
        assert!(!check(
            &[("authorization", &format!("Bearer {}", p.placeholder))],
            "/v1/models"
        ));
        assert!(!check(
            &[("authorization", "Bearer not-a-key")],
            "/v1/models"
        ));
        assert!(!check(
            &[("x-other", &format!("Bearer {real}"))],
            "/v1/models"
        ));
        assert!(!check(&[], "/v1/models"));
    }

    #[test]
    fn random_header_values_are_inspected_and_swapped_without_a_panic() {
        use base64::Engine as _;
        let mut rng = crate::test_rng::Rng::new(11);
        let basic = |s: &str| format!("Basic {}", BASE64.encode(s));
        let parts = [
            "Bearer ", "bearer ", "Basic ", "token ", " ", ":", PH, "x", "=", "%", "\t", "é",
            "====", "ph-", "Zm9v",
        ];
        let routes = [
            route(
                vec![header("authorization", Some(Scheme::Bearer))],
                InjectMode::IfPlaceholder,
            ),
            route(
                vec![header(
                    "authorization",
                    Some(Scheme::Basic {
                        username: Some("u".into()),
                    }),
                )],
                InjectMode::Always,
            ),
            route(vec![header("x-api-key", None)], InjectMode::Always),
            route(
                vec![Injection::Query {
                    param: "key".into(),
                }],
                InjectMode::IfPlaceholder,
            ),
        ];
        let catalog = Catalog::builtin();
        for round in 0..2000 {
            let r = rng.pick(&routes).clone();
            let p = provider(r.clone());
            let mut map = HeaderMap::new();
            for _ in 0..rng.below(4) {
                let text = match rng.below(3) {
                    0 => basic(&rng.text(&parts, 6)),
                    _ => rng.text(&parts, 8),
                };
                // Values a client could not send are refused before the proxy sees them.
                let Ok(value) = HeaderValue::from_str(&text) else {
                    continue;
                };
                let name = *rng.pick(&["authorization", "x-api-key", "cookie"]);
                map.append(name, value);
            }
            let query = rng.text(&["key=", PH, "&", "%2", "x", "="], 6);
            let Ok(mut uri) = format!("/v1?{query}").parse::<Uri>() else {
                continue;
            };
            let findings = inspect(&catalog, &p, &r, &map, &uri);
            let before = map.clone();
            let swapped = apply(&p, &r, &mut map, &mut uri, SECRET)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            if !swapped {
                assert_eq!(map, before, "round {round}: unchanged unless swapped");
            }
            if findings.own_placeholder {
                assert!(swapped, "round {round}: a placeholder found is swapped");
            }
        }
    }

    #[test]
    fn bearer_is_swapped_case_insensitively() {
        let r = route(
            vec![header("authorization", Some(Scheme::Bearer))],
            InjectMode::IfPlaceholder,
        );
        let (changed, h, _) = swap(r, &[("authorization", &format!("bearer {PH}"))], "/v1");
        assert!(changed);
        assert_eq!(h["authorization"], format!("bearer {SECRET}").as_str());
        assert!(h["authorization"].is_sensitive());
    }

    #[test]
    fn token_scheme_and_raw_header() {
        let r = route(
            vec![
                header("authorization", Some(Scheme::Token)),
                header("x-api-key", None),
            ],
            InjectMode::IfPlaceholder,
        );
        let (changed, h, _) = swap(
            r,
            &[("authorization", &format!("token {PH}")), ("x-api-key", PH)],
            "/",
        );
        assert!(changed);
        assert_eq!(h["authorization"], format!("token {SECRET}").as_str());
        assert_eq!(h["x-api-key"], SECRET);
    }

    #[test]
    fn basic_password_and_username_positions() {
        let r = route(
            vec![header(
                "authorization",
                Some(Scheme::Basic {
                    username: Some("x-access-token".into()),
                }),
            )],
            InjectMode::IfPlaceholder,
        );
        let value = format!("Basic {}", BASE64.encode(format!("x-access-token:{PH}")));
        let (changed, h, _) = swap(r.clone(), &[("authorization", &value)], "/");
        assert!(changed);
        let expected = format!(
            "Basic {}",
            BASE64.encode(format!("x-access-token:{SECRET}"))
        );
        assert_eq!(h["authorization"], expected.as_str());

        let value = format!("Basic {}", BASE64.encode(format!("{PH}:")));
        let (changed, h, _) = swap(r, &[("authorization", &value)], "/");
        assert!(changed);
        assert_eq!(
            h["authorization"],
            format!("Basic {}", BASE64.encode(format!("{SECRET}:"))).as_str()
        );
    }

    #[test]
    fn basic_credentials_are_read_only_from_the_basic_scheme() {
        let basic = Scheme::Basic { username: None };
        let read = |value: &[u8]| {
            let value = HeaderValue::from_bytes(value).expect("value");
            match header_credential(&value, Some(&basic)) {
                Some(HeaderCredential::Basic { user, pass }) => Some(format!("{user}|{pass}")),
                _ => None,
            }
        };
        let encoded = BASE64.encode("user:pa:ss");
        assert_eq!(
            read(format!("Basic {encoded}").as_bytes()).as_deref(),
            Some("user|pa:ss")
        );
        assert_eq!(
            read(format!(" bAsIc   {encoded} ").as_bytes()).as_deref(),
            Some("user|pa:ss")
        );
        assert_eq!(read(format!("Basically {encoded}").as_bytes()), None);
        assert_eq!(read(format!("Bearer {encoded}").as_bytes()), None);
        assert_eq!(read(b"Basic"), None);
        assert_eq!(read(b"Basic not-base64!"), None);
        assert_eq!(read(b"Basic \xff\xfe"), None);
        assert_eq!(
            read(format!("Basic {}", BASE64.encode("no colon")).as_bytes()),
            None
        );
    }

    #[test]
    fn query_parameter_is_swapped_and_others_kept() {
        let r = route(
            vec![Injection::Query {
                param: "key".into(),
            }],
            InjectMode::IfPlaceholder,
        );
        let (changed, _, uri) = swap(r, &[], &format!("/v1/models?alt=sse&key={PH}&x=1"));
        assert!(changed);
        assert_eq!(
            uri.to_string(),
            format!("/v1/models?alt=sse&key={SECRET}&x=1")
        );
    }

    #[test]
    fn non_placeholder_values_are_never_touched() {
        let r = route(
            vec![header("authorization", Some(Scheme::Bearer))],
            InjectMode::IfPlaceholder,
        );
        let (changed, h, _) = swap(
            r.clone(),
            &[("authorization", "Bearer someone-elses-key")],
            "/",
        );
        assert!(!changed);
        assert_eq!(h["authorization"], "Bearer someone-elses-key");
        let (changed, h, _) = swap(r, &[("authorization", &format!("Bearer {PH}x"))], "/");
        assert!(!changed, "a placeholder prefix is not the placeholder");
        assert_eq!(h["authorization"], format!("Bearer {PH}x").as_str());
    }

    #[test]
    fn each_value_of_a_repeated_header_is_swapped_in_place() {
        let r = route(vec![header("x-api-key", None)], InjectMode::IfPlaceholder);
        let (changed, h, _) = swap(
            r,
            &[
                ("x-api-key", "first"),
                ("accept", "*/*"),
                ("x-api-key", PH),
                ("x-api-key", "last"),
            ],
            "/",
        );
        assert!(changed);
        let values: Vec<_> = h.get_all("x-api-key").iter().collect();
        assert_eq!(values, ["first", SECRET, "last"]);
        assert!(values[1].is_sensitive(), "kept out of hyper's debug output");
        assert_eq!(h["accept"], "*/*");
    }

    #[test]
    fn always_injects_only_where_nothing_is_sent() {
        let r = route(
            vec![header(
                "authorization",
                Some(Scheme::Basic {
                    username: Some("x-access-token".into()),
                }),
            )],
            InjectMode::Always,
        );
        let (changed, h, _) = swap(
            r.clone(),
            &[],
            "/org/repo.git/info/refs?service=git-upload-pack",
        );
        assert!(changed);
        let expected = format!(
            "Basic {}",
            BASE64.encode(format!("x-access-token:{SECRET}"))
        );
        assert_eq!(h["authorization"], expected.as_str());
        let (changed, h, _) = swap(r, &[("authorization", "Basic dXNlcjpwYXNz")], "/");
        assert!(!changed, "the agent's own credential wins");
        assert_eq!(h["authorization"], "Basic dXNlcjpwYXNz");
    }

    #[test]
    fn a_secret_that_cannot_be_a_header_is_an_error_not_a_panic() {
        let r = route(vec![header("x-api-key", None)], InjectMode::IfPlaceholder);
        let p = provider(r.clone());
        let mut map = HeaderMap::new();
        map.insert("x-api-key", PH.parse().expect("value"));
        let mut uri: Uri = "/".parse().expect("uri");
        assert_eq!(
            apply(&p, &r, &mut map, &mut uri, "bad\nsecret"),
            Err(SwapError::BadCredential)
        );
    }

    #[test]
    fn foreign_placeholders_are_found() {
        let catalog = Catalog::builtin();
        let openai = catalog.get("openai").expect("openai");
        let anthropic = catalog.get("anthropic").expect("anthropic");
        let route = &anthropic.routes[0];
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", openai.placeholder.parse().expect("value"));
        let uri: Uri = "/v1/messages".parse().expect("uri");
        let f = inspect(&catalog, anthropic, route, &headers, &uri);
        assert!(!f.own_placeholder);
        assert_eq!(f.foreign, vec!["openai".to_string()]);
    }

    #[test]
    fn a_refreshed_token_replaces_the_one_the_broker_put() {
        let r = route(
            vec![header("authorization", Some(Scheme::Bearer))],
            InjectMode::IfPlaceholder,
        );
        let (_, mut h, mut uri) = swap(
            r.clone(),
            &[("authorization", &format!("Bearer {PH}"))],
            "/",
        );
        assert!(replace(&r, &mut h, &mut uri, SECRET, "fresh-token").expect("replace"));
        assert_eq!(h["authorization"], "Bearer fresh-token");
    }
}
