//! The provider catalog: which hosts belong to which credential, and where the credential goes.
//!
//! A provider is data, one TOML file each. The built-in ones live in `builtin/*.toml` and are
//! compiled into the binary; custom ones are read from `$BROKER_HOME/providers/*.toml`. Both go
//! through the same parser ([`Provider::from_toml`]), so a built-in is also the best example of a
//! custom file (`broker providers show openai` prints one).
//!
//! ```toml
//! name = "openai"
//! display_name = "OpenAI"
//! env = ["OPENAI_API_KEY"]                      # what the official SDK/CLI reads
//! placeholder = "sk-broker-placeholder-..."     # what the agent holds instead of the key
//! key_pattern = '^sk-[A-Za-z0-9_-]{20,}$'       # real keys (and the placeholder) match it
//! auth = "api_key"                              # or "oauth2" (then an [oauth] table is needed)
//! docs_url = "https://platform.openai.com/api-keys"
//!
//! [[routes]]
//! hosts = ["api.openai.com"]                    # exact or "*.domain"; ":port" and "/path" optional
//! credential = [{ header = "authorization", scheme = "bearer" }]
//! inject = "if_placeholder"                     # default; "always" adds the key to every request
//! ```
//!
//! Rules the parser enforces, and why:
//! - Unknown fields are errors, so a typo (`heder`) does not silently disable a swap.
//! - The placeholder must match `key_pattern`: SDKs that check the key format before sending
//!   must accept it, and `broker add` checks real keys with the same pattern.
//! - Placeholders use only URL-unreserved characters (`A-Za-z0-9-._~`): they travel in query
//!   strings and Basic credentials, where any other character would be encoded and missed.
//! - A host pattern belongs to one provider only: a request is classified by its host, and a
//!   credential must never be sent to a host its provider did not name.
//!
//! Errors name the file, the line and the field (`acme.toml:7:1: unknown field ...`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use regex_lite::Regex;
use serde::{Deserialize, Serialize};

use crate::home::Home;

mod parse;
pub(crate) use parse::line_col;
pub mod trust;

/// The built-in definitions, compiled in. One line per provider; the file name is the origin
/// shown in error messages and by `broker providers show`.
macro_rules! builtin_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("builtin/", $name, ".toml")))),*]
    };
}
const BUILTIN: &[(&str, &str)] = builtin_files![
    "openai",
    "anthropic",
    "github",
    "gitlab",
    "stripe",
    "slack",
    "linear",
    "gemini",
    "mistral",
    "groq",
    "openrouter",
    "huggingface",
    "cohere",
    "deepseek",
    "xai",
    "perplexity",
    "together",
    "fireworks",
    "notion",
    "sentry",
    "replicate",
    "cerebras",
    "azure-openai",
    "ai21",
    "voyage",
    "jina",
    "nvidia",
    "sambanova",
    "hyperbolic",
    "deepinfra",
    "novita",
    "moonshot",
    "zhipu",
    "dashscope",
    "minimax",
    "runpod",
    "elevenlabs",
    "assemblyai",
    "deepgram",
    "stability",
    "ideogram",
    "luma",
    "runway",
    "lambda",
    "featherless",
    "nebius",
    "writer",
    "reka",
    "upstage",
    "friendli",
    "codestral",
    "cartesia",
    "vercel-ai-gateway",
    "portkey",
    "aimlapi",
    "llamacloud",
    "unstructured",
    "langsmith",
    "wandb",
    "helicone",
    "braintrust",
    "mem0",
    "composio",
    "e2b",
    "tavily",
    "exa",
    "serpapi",
    "serper",
    "brave-search",
    "firecrawl",
    "browserbase",
    "apify",
    "you",
    "linkup",
    "parallel",
    "npm",
    "pypi",
    "crates-io",
    "rubygems",
    "vercel",
    "netlify",
    "cloudflare",
    "render",
    "railway",
    "heroku",
    "digitalocean",
    "hetzner-cloud",
    "linode",
    "vultr",
    "supabase",
    "turso",
    "buildkite",
    "circleci",
    "snyk",
    "sonarcloud",
    "terraform-cloud",
    "pulumi",
    "airtable",
    "clickup",
    "monday",
    "todoist",
    "figma",
    "shortcut",
    "calendly",
    "cal-com",
    "typeform",
    "webflow",
    "miro",
    "dropbox",
    "x",
    "intercom",
    "hubspot",
    "contentful",
    "sendgrid",
    "resend",
    "postmark",
    "mailgun",
    "mailchimp",
    "brevo",
    "datadog",
    "honeycomb",
    "newrelic",
    "axiom",
    "rollbar",
    "square",
    "lemonsqueezy",
    "paddle",
    "algolia",
    "mapbox",
    "google-maps",
    "openweather",
    "polygon",
    "alphavantage",
    "aws",
];

/// All providers broker knows, validated as a whole (unique names, hosts, placeholders).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Catalog {
    providers: Vec<Provider>,
    #[serde(skip)]
    placeholders: PlaceholderIndex,
}

/// The providers grouped by the first two bytes of their placeholder, so that a request head
/// is scanned once for every placeholder: at each byte, a bit says whether any placeholder
/// starts with it and the next byte, and only those that do are compared, only where the
/// shortest placeholder still fits. With one scan per provider and header value,
/// `swap::inspect` was 8.5 % of the proxy thread's instructions per keep-alive request; by the
/// first byte alone, 7 %; by a bit per pair, then every placeholder with that first byte,
/// 4.5 %. Now a pair's bit is followed by a bit for the first four bytes, and the pair picks
/// the placeholders to compare (they start with common letters: `s` begins 24 of the
/// built-in ones, `sk` 14):
/// `placeholders_in` 2.2k -> 1.6k instructions per request, most of it the scan itself.
#[derive(Debug, Clone)]
struct PlaceholderIndex {
    /// Bit `256 * a + b` is set when a placeholder starts with the bytes `a b` (or is the
    /// single byte `a`). An array, so that no lookup needs a bounds check.
    first_two: Box<[u64; 1024]>,
    /// The placeholders starting with each pair set in `first_two` (`256 * a + b`), sorted by
    /// the pair: indices in `providers`. A one-byte placeholder `a` is under every `a b`.
    by_first_two: Vec<(u16, Vec<usize>)>,
    /// The one-byte placeholders, the only ones that fit at a haystack's last byte.
    one_byte: Vec<(u8, usize)>,
    /// A bit for each placeholder's first four bytes (hashed to 16 bits), when every
    /// placeholder has four (the parser asks for 16): ordinary text begins some placeholder's
    /// first two bytes every few words, and this turns nearly all of those away before the
    /// placeholders are looked up and compared.
    first_four: Option<Box<[u64; 1024]>>,
    /// Length of the shortest placeholder (`usize::MAX` if there is none): most header values
    /// are shorter, and a placeholder starts only where it still fits.
    shortest: usize,
}

/// Where a catalog serves a host ([`Catalog::serving`]): indices of the provider and route,
/// and of the first of the route's host specs that matches the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    provider: usize,
    route: usize,
    pub spec: usize,
}

fn pair(a: u8, b: u8) -> u16 {
    u16::from(a) << 8 | u16::from(b)
}

/// Four bytes hashed to 16 bits (Fibonacci hashing: the top bits of a multiplication).
fn four(bytes: [u8; 4]) -> u16 {
    (u32::from_le_bytes(bytes).wrapping_mul(0x9E37_79B1) >> 16) as u16
}

fn bit_set(bits: &[u64; 1024], key: u16) -> bool {
    bits[usize::from(key >> 6)] & (1 << (key & 63)) != 0
}

fn set_bit(bits: &mut [u64; 1024], key: u16) {
    bits[usize::from(key >> 6)] |= 1 << (key & 63);
}

impl PlaceholderIndex {
    fn new(providers: &[Provider]) -> PlaceholderIndex {
        let mut first_two = Box::new([0u64; 1024]);
        let mut by_first_two: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        let mut one_byte = Vec::new();
        let mut first_four = Box::new([0u64; 1024]);
        let mut shortest = usize::MAX;
        for (i, p) in providers.iter().enumerate() {
            let pairs: Vec<u16> = match *p.placeholder.as_bytes() {
                [] => continue,
                [a] => {
                    one_byte.push((a, i));
                    (0..=255).map(|b| pair(a, b)).collect()
                }
                [a, b, ..] => vec![pair(a, b)],
            };
            for key in pairs {
                set_bit(&mut first_two, key);
                by_first_two.entry(key).or_default().push(i);
            }
            if let [a, b, c, d, ..] = *p.placeholder.as_bytes() {
                set_bit(&mut first_four, four([a, b, c, d]));
            }
            shortest = shortest.min(p.placeholder.len());
        }
        PlaceholderIndex {
            first_two,
            by_first_two: by_first_two.into_iter().collect(),
            one_byte,
            first_four: (shortest >= 4).then_some(first_four),
            shortest,
        }
    }

    /// Is `key` (`256 * a + b`) the first two bytes of some placeholder?
    fn has_pair(&self, key: u16) -> bool {
        bit_set(&self.first_two, key)
    }

    /// Could a placeholder start at the beginning of `rest` (at least `shortest` bytes)? False
    /// only when none does.
    fn may_start(&self, rest: &[u8]) -> bool {
        match (&self.first_four, rest) {
            (Some(bits), [a, b, c, d, ..]) => bit_set(bits, four([*a, *b, *c, *d])),
            _ => true,
        }
    }

    /// The first index at or after `from` where `starts` holds the first two bytes of some
    /// placeholder.
    fn next_pair_start(&self, starts: &[u8], from: usize) -> Option<usize> {
        let rest = starts.get(from..)?;
        rest.windows(2)
            .position(|two| self.has_pair(pair(two[0], two[1])))
            .map(|i| from + i)
    }

    /// The placeholders starting with the bytes of `key`, if some do. Asked only for a pair
    /// that [`PlaceholderIndex::next_pair_start`] found, so its bit is not checked again.
    fn starting_with(&self, key: u16) -> Option<&[usize]> {
        let at = self
            .by_first_two
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()?;
        Some(&self.by_first_two[at].1)
    }
}

impl Catalog {
    /// The compiled-in definitions. Never panics: a broken built-in (which the tests rule out) is
    /// logged and left out instead.
    pub fn builtin() -> Catalog {
        static BUILTIN_CATALOG: OnceLock<Catalog> = OnceLock::new();
        BUILTIN_CATALOG
            .get_or_init(|| {
                let mut providers = Vec::with_capacity(BUILTIN.len());
                for (name, text) in BUILTIN {
                    match Provider::from_toml(text, Origin::Builtin(name)) {
                        Ok(p) => providers.push(p),
                        Err(err) => tracing::error!("built-in provider skipped: {err}"),
                    }
                }
                match Catalog::from_parts(providers.clone()) {
                    Ok(catalog) => catalog,
                    Err(err) => {
                        tracing::error!("built-in provider catalog is inconsistent: {err}");
                        Catalog::new(providers)
                    }
                }
            })
            .clone()
    }

    /// The built-ins plus every `*.toml` in `home.providers_dir()` (read in file-name order).
    /// A custom provider with a built-in's name replaces that built-in. A missing directory
    /// is not an error; a malformed file is, naming the file, line and field.
    pub fn load(home: &Home) -> Result<Catalog, ProviderError> {
        Catalog::load_from(&home.providers_dir())
    }

    /// The built-ins plus every `*.toml` in `dir` (see [`Catalog::load`]).
    pub fn load_from(dir: &Path) -> Result<Catalog, ProviderError> {
        let mut providers = Catalog::builtin().providers;
        for custom in read_custom_dir(dir)? {
            if let Some(dup) = providers
                .iter()
                .find(|p| p.name == custom.name && !p.origin.is_builtin())
            {
                return Err(ProviderError::conflict(
                    &custom,
                    "name",
                    format!(
                        "provider '{}' is also defined in {}",
                        custom.name, dup.origin
                    ),
                ));
            }
            match providers.iter_mut().find(|p| p.name == custom.name) {
                Some(slot) => {
                    tracing::debug!(
                        "provider {} from {} replaces the built-in definition",
                        custom.name,
                        custom.origin
                    );
                    *slot = custom;
                }
                None => {
                    tracing::debug!("custom provider {} from {}", custom.name, custom.origin);
                    providers.push(custom);
                }
            }
        }
        Catalog::from_parts(providers)
    }

    /// Build a catalog from parsed providers, checking what only the whole set can show: names,
    /// placeholders, env vars and host patterns must each belong to one provider.
    pub fn from_parts(providers: Vec<Provider>) -> Result<Catalog, ProviderError> {
        for (i, p) in providers.iter().enumerate() {
            for earlier in &providers[..i] {
                if earlier.name == p.name {
                    return Err(ProviderError::conflict(
                        p,
                        "name",
                        format!(
                            "provider '{}' is also defined in {}",
                            p.name, earlier.origin
                        ),
                    ));
                }
                if earlier.placeholder == p.placeholder {
                    return Err(ProviderError::conflict(
                        p,
                        "placeholder",
                        format!(
                            "providers '{}' ({}) and '{}' have the same placeholder",
                            earlier.name, earlier.origin, p.name
                        ),
                    ));
                }
                if let Some(var) = p.key_vars().find(|v| earlier.key_vars().any(|e| e == *v)) {
                    return Err(ProviderError::conflict_at(
                        p,
                        "env",
                        var,
                        format!(
                            "env var {var} is claimed by both '{}' ({}) and '{}'",
                            earlier.name, earlier.origin, p.name
                        ),
                    ));
                }
                for pattern in p.host_patterns() {
                    if earlier
                        .host_patterns()
                        .any(|h| h.eq_ignore_ascii_case(pattern))
                    {
                        return Err(ProviderError::conflict_at(
                            p,
                            "hosts",
                            pattern,
                            format!(
                                "host '{pattern}' is claimed by both '{}' ({}) and '{}'",
                                earlier.name, earlier.origin, p.name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Catalog::new(providers))
    }

    fn new(providers: Vec<Provider>) -> Catalog {
        let placeholders = PlaceholderIndex::new(&providers);
        Catalog {
            providers,
            placeholders,
        }
    }

    /// Push onto `owners` the index (into [`Catalog::providers`]) of every provider whose
    /// placeholder occurs in `haystack`, once per occurrence. Overlapping occurrences count:
    /// one placeholder may contain another. Indices, not a flag per provider: a request
    /// carries one placeholder or none, and a walk over a flag per provider of the catalog
    /// cost half as much as the scan (1.4k instructions per request).
    pub fn placeholders_in(&self, haystack: &[u8], owners: &mut Vec<usize>) {
        let index = &self.placeholders;
        let Some(last_start) = haystack.len().checked_sub(index.shortest) else {
            return;
        };
        // Every start with a byte after it, filtered by the pair. The search for the next pair
        // that begins some placeholder is a loop of its own: folded into the one below, its
        // registers spilled to the stack and it cost about 25 instructions a byte.
        let starts = &haystack[..haystack.len().min(last_start.saturating_add(2))];
        let mut from = 0;
        while let Some(at) = index.next_pair_start(starts, from) {
            from = at + 1;
            if !index.may_start(&haystack[at..]) {
                continue;
            }
            let Some(candidates) = index.starting_with(pair(starts[at], starts[at + 1])) else {
                continue;
            };
            for &owner in candidates {
                if haystack[at..].starts_with(self.providers[owner].placeholder.as_bytes()) {
                    owners.push(owner);
                }
            }
        }
        // The last byte, where only a one-byte placeholder fits.
        if last_start + 1 == haystack.len() {
            let last = haystack[last_start];
            owners.extend(
                index
                    .one_byte
                    .iter()
                    .filter(|(b, _)| *b == last)
                    .map(|(_, owner)| *owner),
            );
        }
    }

    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name == name)
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// The provider and route serving `host` (no port; a trailing dot is ignored). An exact
    /// pattern wins over a `*.` pattern, whatever the order of definition.
    pub fn route_for_host(&self, host: &str) -> Option<(&Provider, &Route)> {
        self.route_index_for_host(host)
            .map(|at| self.route_index_at(at))
    }

    /// Where `host` is served, as indices to keep: the proxy finds a connection's route once,
    /// by its SNI, not on every request (the walk covers the whole catalog, and the AWS
    /// patterns come before most providers').
    pub fn serving(&self, host: &str) -> Option<Serving> {
        let (provider, route) = self.route_index_for_host(host)?;
        // The route was found by one of its specs matching: the first that does.
        let spec = self.providers[provider].routes[route]
            .hosts
            .iter()
            .position(|h| broker_contract::host_matches(&h.pattern, host))?;
        Some(Serving {
            provider,
            route,
            spec,
        })
    }

    /// [`Catalog::route_for_host`] as indices (provider, route).
    fn route_index_for_host(&self, host: &str) -> Option<(usize, usize)> {
        let mut wildcard = None;
        for (i, p) in self.providers.iter().enumerate() {
            for (j, route) in p.routes.iter().enumerate() {
                for spec in &route.hosts {
                    if broker_contract::host_matches(&spec.pattern, host) {
                        if !spec.is_wildcard() {
                            return Some((i, j));
                        }
                        wildcard.get_or_insert((i, j));
                    }
                }
            }
        }
        wildcard
    }

    /// The provider and route of a [`Catalog::serving`] of this catalog.
    pub fn route_at(&self, at: Serving) -> (&Provider, &Route) {
        self.route_index_at((at.provider, at.route))
    }

    fn route_index_at(&self, (provider, route): (usize, usize)) -> (&Provider, &Route) {
        let p = &self.providers[provider];
        (p, &p.routes[route])
    }

    /// The host patterns of providers whose hosts may resolve to private addresses
    /// (`private_addresses = true`), for the SSRF guard.
    pub fn private_address_hosts(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter(|p| p.private_addresses)
            .flat_map(|p| p.host_patterns().map(str::to_string))
            .collect()
    }

    /// The names of providers that allow private addresses, for their OAuth endpoints.
    pub fn private_address_providers(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter(|p| p.private_addresses)
            .map(|p| p.name.clone())
            .collect()
    }

    /// Every route host pattern, deduplicated, in definition order.
    pub fn host_patterns(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for pattern in self.providers.iter().flat_map(Provider::host_patterns) {
            if !out.iter().any(|h| h == pattern) {
                out.push(pattern.to_string());
            }
        }
        out
    }
}

/// Read every `*.toml` file of the custom providers directory, in file-name order.
fn read_custom_dir(dir: &Path) -> Result<Vec<Provider>, ProviderError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ProviderError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ProviderError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if is_toml && !hidden {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| ProviderError::Io {
                path: path.clone(),
                source,
            })?;
            Provider::from_toml(&text, Origin::File(path))
        })
        .collect()
}

/// One provider: the credential, the env vars that carry its placeholder, and its hosts.
#[derive(Debug, Clone, Serialize)]
pub struct Provider {
    /// Lowercase id: `openai`.
    pub name: String,
    pub display_name: String,
    /// Env vars the official SDK/CLI reads the key from: set to the placeholder in every run.
    pub env: Vec<String>,
    /// Env vars that may hold the key but need not be set (a client reads another of `env`
    /// too, and warns when both are set): a value there is replaced by the placeholder, and
    /// left unset otherwise.
    pub env_if_set: Vec<String>,
    /// What the agent holds instead of the key.
    pub placeholder: String,
    /// Regex the real key (and the placeholder) must match, whole.
    pub key_pattern: String,
    pub auth: AuthKind,
    pub routes: Vec<Route>,
    pub oauth: Option<OAuthConfig>,
    /// For `auth = "aws_sigv4"`: the secret's and session token's variables and placeholders
    /// (the access key id's are `env` and `placeholder`).
    pub aws_sigv4: Option<Sigv4Config>,
    /// Where the user gets a key.
    pub docs_url: Option<String>,
    /// Its hosts may resolve to loopback, private, link-local or metadata addresses (a custom
    /// provider for an internal API); otherwise the broker refuses to connect there.
    pub private_addresses: bool,
    /// `key_pattern`, anchored at both ends and compiled.
    #[serde(skip)]
    key_regex: Regex,
    /// Where the definition came from.
    #[serde(rename = "source")]
    origin: Origin,
    /// The TOML text it was parsed from, for `broker providers show`.
    #[serde(skip)]
    text: Arc<str>,
}

impl PartialEq for Provider {
    fn eq(&self, other: &Provider) -> bool {
        // `key_regex` is compiled from `key_pattern`; where it came from does not matter.
        self.name == other.name
            && self.display_name == other.display_name
            && self.env == other.env
            && self.env_if_set == other.env_if_set
            && self.placeholder == other.placeholder
            && self.key_pattern == other.key_pattern
            && self.auth == other.auth
            && self.routes == other.routes
            && self.oauth == other.oauth
            && self.aws_sigv4 == other.aws_sigv4
            && self.docs_url == other.docs_url
            && self.private_addresses == other.private_addresses
    }
}

impl Provider {
    /// Every env var that may hold this provider's key: `env`, then `env_if_set`, then an AWS
    /// credential's secret and session token variables.
    pub fn key_vars(&self) -> impl Iterator<Item = &String> {
        let sigv4 = self
            .aws_sigv4
            .iter()
            .flat_map(|s| [&s.secret_env, &s.session_token_env]);
        self.env.iter().chain(&self.env_if_set).chain(sigv4)
    }

    /// `(variable, placeholder)` for the variables every run sets: `env` with the placeholder,
    /// and an AWS credential's secret variable with its own.
    pub fn env_placeholders(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .env
            .iter()
            .map(|var| (var.clone(), self.placeholder.clone()))
            .collect();
        if let Some(s) = &self.aws_sigv4 {
            out.push((s.secret_env.clone(), s.secret_placeholder.clone()));
        }
        out
    }

    /// `(variable, placeholder)` for the variables set only where already set: `env_if_set`,
    /// and an AWS session token's variable (a real token there is hidden; the broker adds
    /// the stored credential's own).
    pub fn env_if_set_placeholders(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .env_if_set
            .iter()
            .map(|var| (var.clone(), self.placeholder.clone()))
            .collect();
        if let Some(s) = &self.aws_sigv4 {
            out.push((
                s.session_token_env.clone(),
                s.session_token_placeholder.clone(),
            ));
        }
        out
    }

    /// Parse and validate one provider definition. `origin` is what errors name as the file
    /// (a path for custom files).
    pub fn from_toml(text: &str, origin: impl Into<Origin>) -> Result<Provider, ProviderError> {
        parse::parse_provider(text, origin.into())
    }

    /// Does `secret` look like a key of this provider (the whole string matches `key_pattern`)?
    pub fn key_matches(&self, secret: &str) -> bool {
        self.key_regex.is_match(secret)
    }

    /// Is `value` exactly this provider's placeholder?
    pub fn is_placeholder(&self, value: &str) -> bool {
        value == self.placeholder
    }

    /// Every host pattern of every route, in order (may repeat across routes with other ports).
    pub fn host_patterns(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .flat_map(|r| r.hosts.iter().map(|h| h.pattern.as_str()))
    }

    /// Where the definition came from: built in, or a custom file.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The TOML text the definition was parsed from.
    pub fn source_text(&self) -> &str {
        &self.text
    }
}

/// Where a provider definition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compiled in from `broker/src/providers/builtin/<name>.toml`.
    Builtin(&'static str),
    /// A custom file (or any other named source, e.g. in tests).
    File(PathBuf),
}

impl Origin {
    pub fn is_builtin(&self) -> bool {
        matches!(self, Origin::Builtin(_))
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(name) => write!(f, "<built-in>/{name}.toml"),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl From<PathBuf> for Origin {
    fn from(path: PathBuf) -> Origin {
        Origin::File(path)
    }
}

impl From<&Path> for Origin {
    fn from(path: &Path) -> Origin {
        Origin::File(path.to_path_buf())
    }
}

impl From<&str> for Origin {
    fn from(path: &str) -> Origin {
        Origin::File(PathBuf::from(path))
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Origin::Builtin(_) => s.serialize_str("builtin"),
            Origin::File(path) => s.serialize_str(&path.to_string_lossy()),
        }
    }
}

/// How the user obtains the credential. `oauth2` providers need an `[oauth]` table; `api_key`
/// providers may have one too (an OAuth token from `broker login` is then stored like a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AuthKind {
    #[default]
    #[serde(rename = "api_key")]
    ApiKey,
    #[serde(rename = "oauth2")]
    OAuth2,
    /// AWS Signature Version 4: the agent signs with placeholder credentials and the broker
    /// signs again with the real ones (`proxy::sigv4`); needs an `[aws_sigv4]` table.
    #[serde(rename = "aws_sigv4")]
    AwsSigv4,
}

/// The placeholders of an AWS credential besides the access key id. TOML:
/// `[aws_sigv4]` with `secret_env`, `secret_placeholder`, `session_token_env`,
/// `session_token_placeholder`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sigv4Config {
    pub secret_env: String,
    pub secret_placeholder: String,
    pub session_token_env: String,
    pub session_token_placeholder: String,
}

impl fmt::Display for AuthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthKind::ApiKey => "api_key",
            AuthKind::OAuth2 => "oauth2",
            AuthKind::AwsSigv4 => "aws_sigv4",
        })
    }
}

/// A set of hosts and how the credential is carried on requests to them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub hosts: Vec<HostSpec>,
    /// Every place the credential may appear. A placeholder is swapped wherever one of these
    /// finds it; with `inject = "always"`, the first entry is how the key is added to a request
    /// that carries none.
    pub credential: Vec<Injection>,
    pub inject: InjectMode,
    /// The grant of each host spec (`trust::grant`), computed once: checked on every request
    /// that would carry the credential.
    #[serde(skip)]
    pub grants: Vec<std::sync::Arc<str>>,
}

impl Route {
    /// A route, with the grant of each host spec computed.
    pub fn new(hosts: Vec<HostSpec>, credential: Vec<Injection>, inject: InjectMode) -> Route {
        let grants = hosts
            .iter()
            .map(|spec| trust::grant(spec, &credential, inject, false).into())
            .collect();
        Route {
            hosts,
            credential,
            inject,
            grants,
        }
    }

    /// Mark the route's hosts as reachable at private addresses: that is part of what the
    /// user accepts for the key (a definition that gains it needs `broker providers trust`).
    pub fn allow_private_addresses(&mut self) {
        self.grants = self
            .hosts
            .iter()
            .map(|spec| trust::grant(spec, &self.credential, self.inject, true).into())
            .collect();
    }
}

/// When the broker puts the credential on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectMode {
    /// Only where the request carries the placeholder (the default).
    #[default]
    IfPlaceholder,
    /// Also on requests that carry no credential at all (git smart-HTTP sends none until
    /// challenged). A request carrying some other credential is left alone.
    Always,
}

/// A host pattern with its port and optional path prefix. TOML string form:
/// `api.example.com`, `*.example.com`, `api.example.com:8443`, `example.com/api`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSpec {
    /// Exact hostname or `*.` + domain (one label), lowercase; see
    /// [`broker_contract::host_matches`].
    pub pattern: String,
    /// 443 unless given.
    pub port: u16,
    /// When set (starting with `/`), only requests whose path starts with it get the credential.
    pub path_prefix: Option<String>,
}

impl HostSpec {
    pub const DEFAULT_PORT: u16 = 443;

    /// Parse the TOML string form. The error says what is wrong, without the input.
    pub fn parse(s: &str) -> Result<HostSpec, String> {
        parse::parse_host_spec(s)
    }

    pub fn is_wildcard(&self) -> bool {
        self.pattern.starts_with("*.")
    }
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)?;
        if self.port != HostSpec::DEFAULT_PORT {
            write!(f, ":{}", self.port)?;
        }
        if let Some(prefix) = &self.path_prefix {
            f.write_str(prefix)?;
        }
        Ok(())
    }
}

/// One place the credential goes. TOML: `{ header = "authorization", scheme = "bearer" }`,
/// `{ header = "x-api-key" }`, `{ query = "key" }`,
/// `{ header = "authorization", scheme = "basic", basic_username = "x-access-token" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Injection {
    /// A request header; `name` is lowercase. Without a scheme, the header value is the key.
    Header {
        name: String,
        scheme: Option<Scheme>,
    },
    /// A query parameter whose value is the key.
    Query { param: String },
}

/// The `Authorization` scheme in front of the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Scheme {
    /// `Bearer <key>`.
    Bearer,
    /// `token <key>` (GitHub's older form).
    Token,
    /// `Basic base64(user:password)`. A placeholder is swapped in either half (`curl -u key:`
    /// sends a Stripe key as the user name; git sends a token as the password). To inject
    /// (`inject = "always"`), `username` (e.g. `x-access-token`) is sent with the key as the
    /// password; the parser requires a username on such a route.
    Basic { username: Option<String> },
}

/// OAuth endpoints and settings for `broker login`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OAuthConfig {
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    pub device_url: Option<String>,
    pub revoke_url: Option<String>,
    pub scopes: Vec<String>,
    /// Usually from the user's `config.toml`; a built-in never ships one.
    pub client_id: Option<String>,
    pub client_auth: ClientAuth,
    /// The provider supports the device authorization grant (RFC 8628) at `device_url`.
    pub device_flow: bool,
    pub grant: Grant,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A public client: `client_id` only (PKCE, device flow).
    None,
    /// HTTP Basic with client id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    #[default]
    Post,
}

/// The OAuth grant `broker login` uses (besides the device flow when `device_flow` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    #[default]
    AuthorizationCode,
    ClientCredentials,
}

/// A provider definition that cannot be used. Display names the file, and the line, column and
/// field when known: `acme.toml:7:1: unknown field 'heder', expected ...`.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", format_invalid(file, *line, *col, field.as_deref(), message))]
    Invalid {
        /// The file (or `<built-in>/name.toml`).
        file: String,
        /// 1-based line and column, when known.
        line: Option<usize>,
        col: Option<usize>,
        /// The field at fault (`routes.credential.header`), when known.
        field: Option<String>,
        message: String,
    },
}

fn format_invalid(
    file: &str,
    line: Option<usize>,
    col: Option<usize>,
    field: Option<&str>,
    message: &str,
) -> String {
    let mut out = file.to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
        if let Some(col) = col {
            out.push_str(&format!(":{col}"));
        }
    }
    out.push_str(": ");
    if let Some(field) = field {
        out.push_str(&format!("field '{field}': "));
    }
    out.push_str(message);
    out
}

impl ProviderError {
    /// A conflict found in `p`, located at its first line defining `field`.
    fn conflict(p: &Provider, field: &str, message: String) -> ProviderError {
        let line = parse::line_of_key(&p.text, field);
        ProviderError::Invalid {
            file: p.origin.to_string(),
            line,
            col: None,
            field: Some(field.to_string()),
            message,
        }
    }

    /// A conflict found in `p`, located at the line where `value` (quoted) appears.
    fn conflict_at(p: &Provider, field: &str, value: &str, message: String) -> ProviderError {
        let line =
            parse::line_of_value(&p.text, value).or_else(|| parse::line_of_key(&p.text, field));
        ProviderError::Invalid {
            file: p.origin.to_string(),
            line,
            col: None,
            field: Some(field.to_string()),
            message,
        }
    }
}

#[cfg(test)]
mod tests;
