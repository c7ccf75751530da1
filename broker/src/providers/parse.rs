//! The TOML parser for provider definitions: raw serde structs (unknown fields denied, spans
//! kept), then validation into the public types. Built-ins and custom files both come here.

use std::ops::Range;
use std::sync::Arc;

use regex_lite::Regex;
use serde::Deserialize;
use toml::Spanned;

use super::{
    AuthKind, ClientAuth, Grant, HostSpec, InjectMode, Injection, OAuthConfig, Origin, Provider,
    ProviderError, Route, Scheme, Sigv4Config,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: Spanned<String>,
    display_name: Option<String>,
    #[serde(default)]
    env: Vec<Spanned<String>>,
    #[serde(default)]
    env_if_set: Vec<Spanned<String>>,
    placeholder: Spanned<String>,
    key_pattern: Spanned<String>,
    auth: Option<Spanned<AuthKind>>,
    docs_url: Option<Spanned<String>>,
    routes: Spanned<Vec<Spanned<RawRoute>>>,
    oauth: Option<Spanned<RawOAuth>>,
    /// The provider's hosts may resolve to loopback, private or link-local addresses (an
    /// internal API): the broker's SSRF guard lets them through.
    #[serde(default)]
    private_addresses: bool,
    aws_sigv4: Option<Spanned<RawSigv4>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigv4 {
    secret_env: Spanned<String>,
    secret_placeholder: Spanned<String>,
    session_token_env: Spanned<String>,
    session_token_placeholder: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    hosts: Spanned<Vec<Spanned<String>>>,
    credential: Spanned<Vec<Spanned<RawInjection>>>,
    #[serde(default)]
    inject: InjectMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInjection {
    header: Option<String>,
    query: Option<String>,
    scheme: Option<RawScheme>,
    basic_username: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawScheme {
    Bearer,
    Token,
    Basic,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    authorize_url: Option<Spanned<String>>,
    token_url: Option<Spanned<String>>,
    device_url: Option<Spanned<String>>,
    revoke_url: Option<Spanned<String>>,
    #[serde(default)]
    scopes: Vec<String>,
    client_id: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    device_flow: Option<Spanned<bool>>,
    #[serde(default)]
    grant: Grant,
}

/// Headers the broker must never set from a provider definition: they frame the message or
/// choose its destination.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
];

/// The file being parsed, for error locations.
struct Ctx<'a> {
    file: String,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        field: &str,
        message: impl Into<String>,
    ) -> ProviderError {
        let (line, col) = match span {
            Some(span) => {
                let (l, c) = line_col(self.text, span.start);
                (Some(l), Some(c))
            }
            None => (
                line_of_key(self.text, field.rsplit('.').next().unwrap_or(field)),
                None,
            ),
        };
        ProviderError::Invalid {
            file: self.file.clone(),
            line,
            col,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }
}

pub(super) fn parse_provider(text: &str, origin: Origin) -> Result<Provider, ProviderError> {
    let cx = Ctx {
        file: origin.to_string(),
        text,
    };
    let raw: RawProvider = toml::from_str(text).map_err(|e| toml_error(&cx, &e))?;

    let name = raw.name.get_ref();
    if !valid_name(name) {
        return Err(cx.err(
            Some(raw.name.span()),
            "name",
            format!("'{name}' is not a valid provider name (lowercase letters, digits, '-', '_'; at most 63)"),
        ));
    }

    let mut env = Vec::with_capacity(raw.env.len());
    let mut env_if_set = Vec::with_capacity(raw.env_if_set.len());
    for (field, list) in [("env", &raw.env), ("env_if_set", &raw.env_if_set)] {
        for var in list {
            let v = var.get_ref();
            if !valid_env_name(v) {
                return Err(cx.err(
                    Some(var.span()),
                    field,
                    format!("'{v}' is not a valid environment variable name"),
                ));
            }
            if env.contains(v) || env_if_set.contains(v) {
                return Err(cx.err(Some(var.span()), field, format!("'{v}' is listed twice")));
            }
            match field {
                "env" => env.push(v.clone()),
                _ => env_if_set.push(v.clone()),
            }
        }
    }

    let key_pattern = raw.key_pattern.get_ref();
    if key_pattern.is_empty() {
        return Err(cx.err(
            Some(raw.key_pattern.span()),
            "key_pattern",
            "must not be empty",
        ));
    }
    // Anchored on both ends whatever the author wrote: a key matches only as a whole.
    let key_regex = Regex::new(&format!("^(?:{key_pattern})$")).map_err(|e| {
        cx.err(
            Some(raw.key_pattern.span()),
            "key_pattern",
            format!("invalid regex: {e}"),
        )
    })?;

    let placeholder = raw.placeholder.get_ref();
    if let Err(why) = check_placeholder(placeholder) {
        return Err(cx.err(Some(raw.placeholder.span()), "placeholder", why));
    }
    if !key_regex.is_match(placeholder) {
        return Err(cx.err(
            Some(raw.placeholder.span()),
            "placeholder",
            format!("'{placeholder}' does not match key_pattern '{key_pattern}' (SDKs that check the key format would reject it)"),
        ));
    }

    let docs_url = match &raw.docs_url {
        Some(url) => {
            check_url(url.get_ref()).map_err(|why| cx.err(Some(url.span()), "docs_url", why))?;
            Some(url.get_ref().clone())
        }
        None => None,
    };

    if raw.routes.get_ref().is_empty() {
        return Err(cx.err(
            Some(raw.routes.span()),
            "routes",
            "at least one route is needed",
        ));
    }
    let mut routes = Vec::with_capacity(raw.routes.get_ref().len());
    for raw_route in raw.routes.get_ref() {
        let route = parse_route(&cx, raw_route)?;
        // Two routes of one provider claiming one host would make the classification depend
        // on the order of definition.
        for spec in &route.hosts {
            let taken = routes
                .iter()
                .flat_map(|r: &Route| r.hosts.iter())
                .any(|h: &HostSpec| h.pattern == spec.pattern);
            if taken {
                let span = raw_route.get_ref().hosts.span();
                return Err(cx.err(
                    Some(span),
                    "routes.hosts",
                    format!("host '{}' is in two routes", spec.pattern),
                ));
            }
        }
        routes.push(route);
    }
    if raw.private_addresses {
        for route in &mut routes {
            route.allow_private_addresses();
        }
    }

    let oauth = match &raw.oauth {
        Some(o) => Some(parse_oauth(&cx, o)?),
        None => None,
    };
    let auth = raw.auth.as_ref().map_or(AuthKind::ApiKey, |a| *a.get_ref());
    if auth == AuthKind::OAuth2 && oauth.as_ref().is_none_or(|o| o.token_url.is_none()) {
        return Err(cx.err(
            raw.auth.as_ref().map(Spanned::span),
            "auth",
            "auth = \"oauth2\" needs an [oauth] table with a token_url",
        ));
    }

    let aws_sigv4 = parse_sigv4(
        &cx,
        raw.aws_sigv4.as_ref(),
        auth,
        raw.auth.as_ref(),
        &env,
        &env_if_set,
        placeholder,
    )?;

    Ok(Provider {
        name: name.clone(),
        display_name: raw.display_name.unwrap_or_else(|| name.clone()),
        env,
        env_if_set,
        placeholder: placeholder.clone(),
        key_pattern: key_pattern.clone(),
        auth,
        routes,
        oauth,
        aws_sigv4,
        docs_url,
        private_addresses: raw.private_addresses,
        key_regex,
        origin,
        text: Arc::from(text),
    })
}

/// The `[aws_sigv4]` table: present exactly when `auth = "aws_sigv4"`, its variables not
/// among the provider's others, its placeholders valid and distinct.
fn parse_sigv4(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<RawSigv4>>,
    auth: AuthKind,
    auth_span: Option<&Spanned<AuthKind>>,
    env: &[String],
    env_if_set: &[String],
    placeholder: &str,
) -> Result<Option<Sigv4Config>, ProviderError> {
    let raw = match (auth, raw) {
        (AuthKind::AwsSigv4, Some(raw)) => raw,
        (AuthKind::AwsSigv4, None) => {
            return Err(cx.err(
                auth_span.map(Spanned::span),
                "auth",
                "auth = \"aws_sigv4\" needs an [aws_sigv4] table (secret_env, secret_placeholder, session_token_env, session_token_placeholder)",
            ))
        }
        (_, Some(raw)) => {
            return Err(cx.err(
                Some(raw.span()),
                "aws_sigv4",
                "an [aws_sigv4] table needs auth = \"aws_sigv4\"",
            ))
        }
        (_, None) => return Ok(None),
    };
    let r = raw.get_ref();
    let mut seen: Vec<&str> = env.iter().chain(env_if_set).map(String::as_str).collect();
    for (field, var) in [
        ("aws_sigv4.secret_env", &r.secret_env),
        ("aws_sigv4.session_token_env", &r.session_token_env),
    ] {
        let v = var.get_ref();
        if !valid_env_name(v) {
            return Err(cx.err(
                Some(var.span()),
                field,
                format!("'{v}' is not a valid environment variable name"),
            ));
        }
        if seen.contains(&v.as_str()) {
            return Err(cx.err(Some(var.span()), field, format!("'{v}' is listed twice")));
        }
        seen.push(v);
    }
    let mut placeholders = vec![placeholder];
    for (field, p) in [
        ("aws_sigv4.secret_placeholder", &r.secret_placeholder),
        (
            "aws_sigv4.session_token_placeholder",
            &r.session_token_placeholder,
        ),
    ] {
        check_placeholder(p.get_ref()).map_err(|why| cx.err(Some(p.span()), field, why))?;
        if placeholders.contains(&p.get_ref().as_str()) {
            return Err(cx.err(
                Some(p.span()),
                field,
                "must differ from the provider's other placeholders",
            ));
        }
        placeholders.push(p.get_ref());
    }
    Ok(Some(Sigv4Config {
        secret_env: r.secret_env.get_ref().clone(),
        secret_placeholder: r.secret_placeholder.get_ref().clone(),
        session_token_env: r.session_token_env.get_ref().clone(),
        session_token_placeholder: r.session_token_placeholder.get_ref().clone(),
    }))
}

fn parse_route(cx: &Ctx<'_>, raw: &Spanned<RawRoute>) -> Result<Route, ProviderError> {
    let r = raw.get_ref();
    if r.hosts.get_ref().is_empty() {
        return Err(cx.err(
            Some(r.hosts.span()),
            "routes.hosts",
            "at least one host is needed",
        ));
    }
    let mut hosts = Vec::with_capacity(r.hosts.get_ref().len());
    for h in r.hosts.get_ref() {
        let spec = parse_host_spec(h.get_ref()).map_err(|why| {
            cx.err(
                Some(h.span()),
                "routes.hosts",
                format!("'{}': {why}", h.get_ref()),
            )
        })?;
        if hosts.iter().any(|s: &HostSpec| s.pattern == spec.pattern) {
            return Err(cx.err(
                Some(h.span()),
                "routes.hosts",
                format!("'{}' is listed twice", spec.pattern),
            ));
        }
        hosts.push(spec);
    }
    if r.credential.get_ref().is_empty() {
        return Err(cx.err(
            Some(r.credential.span()),
            "routes.credential",
            "at least one place for the credential is needed",
        ));
    }
    let mut credential = Vec::with_capacity(r.credential.get_ref().len());
    for c in r.credential.get_ref() {
        let inj = parse_injection(c.get_ref()).map_err(|(field, why)| {
            cx.err(Some(c.span()), &format!("routes.credential.{field}"), why)
        })?;
        if credential.contains(&inj) {
            return Err(cx.err(Some(c.span()), "routes.credential", "listed twice"));
        }
        credential.push(inj);
    }
    // Injecting needs to know who the key is sent as; swapping a placeholder does not.
    if r.inject == InjectMode::Always {
        if let Some(Injection::Header {
            scheme: Some(Scheme::Basic { username: None }),
            ..
        }) = credential.first()
        {
            return Err(cx.err(
                Some(r.credential.span()),
                "routes.credential.basic_username",
                "inject = \"always\" with a Basic credential first needs basic_username (the user name sent with the key)",
            ));
        }
    }
    Ok(Route::new(hosts, credential, r.inject))
}

fn parse_injection(raw: &RawInjection) -> Result<Injection, (&'static str, String)> {
    match (&raw.header, &raw.query) {
        (Some(_), Some(_)) => Err(("query", "give either 'header' or 'query', not both".into())),
        (None, None) => Err((
            "header",
            "give 'header' (a header name) or 'query' (a parameter name)".into(),
        )),
        (None, Some(param)) => {
            if raw.scheme.is_some() || raw.basic_username.is_some() {
                return Err(("scheme", "a query parameter takes no scheme".into()));
            }
            if param.is_empty() || !param.bytes().all(is_unreserved) {
                return Err(("query", format!("'{param}' is not a plain parameter name")));
            }
            Ok(Injection::Query {
                param: param.clone(),
            })
        }
        (Some(header), None) => {
            let name = header.to_ascii_lowercase();
            if name.is_empty() || !name.bytes().all(is_token_char) {
                return Err(("header", format!("'{header}' is not a valid header name")));
            }
            if FORBIDDEN_HEADERS.contains(&name.as_str()) {
                return Err(("header", format!("'{name}' cannot carry a credential")));
            }
            let scheme = match raw.scheme {
                None => None,
                Some(RawScheme::Bearer) => Some(Scheme::Bearer),
                Some(RawScheme::Token) => Some(Scheme::Token),
                Some(RawScheme::Basic) => Some(Scheme::Basic {
                    username: raw.basic_username.clone(),
                }),
            };
            if let Some(user) = &raw.basic_username {
                if !matches!(raw.scheme, Some(RawScheme::Basic)) {
                    return Err(("basic_username", "only with scheme = \"basic\"".into()));
                }
                if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                    return Err(("basic_username", format!("'{user}' cannot be a Basic user name (empty, ':' or a control character)")));
                }
            }
            Ok(Injection::Header { name, scheme })
        }
    }
}

fn parse_oauth(cx: &Ctx<'_>, raw: &Spanned<RawOAuth>) -> Result<OAuthConfig, ProviderError> {
    let o = raw.get_ref();
    let url = |field: &str, v: &Option<Spanned<String>>| -> Result<Option<String>, ProviderError> {
        match v {
            Some(u) => {
                check_url(u.get_ref())
                    .map_err(|why| cx.err(Some(u.span()), &format!("oauth.{field}"), why))?;
                Ok(Some(u.get_ref().clone()))
            }
            None => Ok(None),
        }
    };
    let cfg = OAuthConfig {
        authorize_url: url("authorize_url", &o.authorize_url)?,
        token_url: url("token_url", &o.token_url)?,
        device_url: url("device_url", &o.device_url)?,
        revoke_url: url("revoke_url", &o.revoke_url)?,
        scopes: o.scopes.clone(),
        client_id: o.client_id.clone(),
        client_auth: o.client_auth,
        device_flow: o.device_flow.as_ref().is_some_and(|d| *d.get_ref()),
        grant: o.grant,
    };
    if cfg.device_flow && cfg.device_url.is_none() {
        return Err(cx.err(
            o.device_flow.as_ref().map(Spanned::span),
            "oauth.device_flow",
            "device_flow = true needs a device_url",
        ));
    }
    if cfg.token_url.is_none() {
        return Err(cx.err(
            Some(raw.span()),
            "oauth.token_url",
            "missing: every OAuth flow ends at the token endpoint",
        ));
    }
    if cfg.grant == Grant::AuthorizationCode && cfg.authorize_url.is_none() && !cfg.device_flow {
        return Err(cx.err(
            Some(raw.span()),
            "oauth.authorize_url",
            "missing: the authorization_code grant starts there",
        ));
    }
    Ok(cfg)
}

/// Parse `host[:port][/path]`. Host patterns: an exact name, or `*.` and a domain of at least
/// two labels (`*.com` would cover a whole top-level domain).
pub(super) fn parse_host_spec(s: &str) -> Result<HostSpec, String> {
    let (authority, path_prefix) = match s.find('/') {
        Some(i) => (&s[..i], Some(s[i..].to_string())),
        None => (s, None),
    };
    if let Some(prefix) = &path_prefix {
        if prefix.len() < 2
            || prefix.contains(['?', '#'])
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err("a path prefix is '/' and a plain path, without '?' or '#'".into());
        }
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => {
            let port: u16 = port.parse().map_err(|_| format!("bad port '{port}'"))?;
            if port == 0 {
                return Err("port 0 is not a port".into());
            }
            (host, port)
        }
        None => (authority, HostSpec::DEFAULT_PORT),
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() {
        return Err("empty host".into());
    }
    if host.len() > 253 {
        return Err("host name too long".into());
    }
    let (wildcard, domain) = match host.strip_prefix("*.") {
        Some(domain) => (true, domain),
        None => (false, host.as_str()),
    };
    let labels: Vec<&str> = domain.split('.').collect();
    for label in &labels {
        if label.contains('*') {
            return Err("'*' is allowed only as the whole first label ('*.example.com')".into());
        }
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("'{label}' is not a valid host name label"));
        }
    }
    if wildcard && labels.len() < 2 {
        return Err("a wildcard needs a domain of at least two labels ('*.example.com')".into());
    }
    Ok(HostSpec {
        pattern: host,
        port,
        path_prefix,
    })
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

fn valid_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A placeholder must survive every place it travels unchanged: headers, query strings (no
/// percent-encoding), Basic credentials (no ':'), the shim's config file (no whitespace).
fn check_placeholder(p: &str) -> Result<(), String> {
    if p.len() < 16 {
        return Err("must be at least 16 characters, so it cannot appear by accident".into());
    }
    if p.len() > 256 {
        return Err("must be at most 256 characters".into());
    }
    if !p.bytes().all(is_unreserved) {
        return Err(
            "may only contain A-Z a-z 0-9 '-' '.' '_' '~' (it travels in URLs and headers)".into(),
        );
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://") {
        // Plain http only to this machine (tests, local development servers).
        let host = rest.split(['/', ':']).next().unwrap_or("");
        if !matches!(host, "localhost" | "127.0.0.1" | "[") {
            return Err(format!("'{url}' must use https"));
        }
        rest
    } else {
        return Err(format!("'{url}' is not an https URL"));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("'{url}' is not a valid URL"));
    }
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Turn a toml/serde error into one naming the file, line, column and, when the message does
/// not already, the field.
fn toml_error(cx: &Ctx<'_>, e: &toml::de::Error) -> ProviderError {
    let message = e.message().trim().replace('`', "'");
    let (line, col, field) = match e.span() {
        Some(span) => {
            let (l, c) = line_col(cx.text, span.start);
            let field = if message.contains("field '") {
                None
            } else {
                key_before(cx.text, span.start)
            };
            (Some(l), Some(c), field)
        }
        None => (None, None, None),
    };
    ProviderError::Invalid {
        file: cx.file.clone(),
        line,
        col,
        field,
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset`.
/// 1-based line and column (in characters) of byte `offset` in `text`, for error messages;
/// shared by every parser of a user-edited file (providers, policy, imported JSON).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// The key whose value contains byte `offset`: the nearest `key =` before it (on its line, or on
/// an earlier line for a value spanning lines). A key inside an inline table is found too.
fn key_before(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    let eq = before.rfind('=')?;
    // A table header after the '=' means the value we are in is not that key's.
    if before[eq..].contains("\n[") {
        return None;
    }
    let key_end = before[..eq].trim_end();
    // The key starts after the last character that cannot be in one (which may be several
    // bytes long: a provider file may hold any UTF-8).
    let start = key_end
        .char_indices()
        .rev()
        .find(|&(_, c)| {
            !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' || c == '"')
        })
        .map_or(0, |(i, c)| i + c.len_utf8());
    let key = key_end[start..].trim_matches('"');
    (!key.is_empty()).then(|| key.to_string())
}

/// 1-based line of the first `key =` (at the start of a line or in an inline table).
pub(super) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            line.strip_prefix(key)
                .map(|rest| rest.trim_start().starts_with('='))
                .unwrap_or(false)
                || line.contains(&format!("{{ {key} ="))
                || line.contains(&format!(", {key} ="))
        })
        .map(|i| i + 1)
}

/// 1-based line of the first line holding `"value"` (quoted as in TOML).
pub(super) fn line_of_value(text: &str, value: &str) -> Option<usize> {
    let quoted = format!("\"{value}");
    let single = format!("'{value}");
    text.lines()
        .position(|l| l.contains(&quoted) || l.contains(&single))
        .map(|i| i + 1)
}
