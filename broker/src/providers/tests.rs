use std::collections::HashSet;
use std::path::Path;

use super::*;

/// The regex the repository's leak scanner runs: no placeholder may look like a leaked key.
const LEAK_SCANNER: &str = r"(sk-[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{30,}|sk_live_[A-Za-z0-9]{10,})";

/// Providers whose placeholder cannot spell "broker" in lower case (their CLI warns on any
/// other format; an AWS access key id is upper case: `AKIABROKERPLACEHOLDR`).
const PLACEHOLDER_WITHOUT_WORD: &[&str] = &["sentry", "aws"];

fn parse(text: &str) -> Result<Provider, ProviderError> {
    Provider::from_toml(text, "/home/u/.local/share/broker/providers/acme.toml")
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(p) => panic!("expected an error, parsed {}", p.name),
        Err(e) => e.to_string(),
    }
}

const ACME: &str = r#"name = "acme"
display_name = "Acme"
env = ["ACME_API_KEY"]
placeholder = "acme_broker_placeholder_0000"
key_pattern = '^acme_[a-z0-9_]{20,}$'

[[routes]]
hosts = ["api.acme.test", "*.acme.example", "upload.acme.test:8443/v1"]
credential = [{ header = "x-acme-key" }, { query = "api_key" }]
"#;

#[test]
fn every_builtin_parses_and_the_catalog_is_consistent() {
    let mut parsed = Vec::new();
    for (file, text) in BUILTIN {
        let p = Provider::from_toml(text, Origin::Builtin(file))
            .unwrap_or_else(|e| panic!("built-in {file}: {e}"));
        assert_eq!(&p.name, file, "file name and provider name agree");
        parsed.push(p);
    }
    Catalog::from_parts(parsed).expect("built-ins are consistent");
    let catalog = Catalog::builtin();
    assert_eq!(catalog.providers().len(), BUILTIN.len());
    for name in [
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
    ] {
        assert!(catalog.get(name).is_some(), "missing built-in {name}");
    }
}

#[test]
fn builtin_placeholders_match_their_pattern_and_not_the_leak_scanner() {
    let leak = regex_lite::Regex::new(LEAK_SCANNER).expect("regex");
    for p in Catalog::builtin().providers() {
        assert!(
            p.key_matches(&p.placeholder),
            "{}: placeholder fails key_pattern",
            p.name
        );
        assert!(p.is_placeholder(&p.placeholder));
        assert!(
            !leak.is_match(&p.placeholder),
            "{}: placeholder looks like a leaked key",
            p.name
        );
        if !PLACEHOLDER_WITHOUT_WORD.contains(&p.name.as_str()) {
            assert!(
                p.placeholder.contains("broker") && p.placeholder.contains("placeholder"),
                "{}: placeholder must say what it is",
                p.name
            );
        }
        assert!(!p.env.is_empty(), "{}: no env var", p.name);
        assert!(p.docs_url.is_some(), "{}: no docs_url", p.name);
    }
    // The whole tree of built-in definitions (comments included) stays clean too.
    for (file, text) in BUILTIN {
        assert!(
            !leak.is_match(text),
            "{file}.toml contains something that looks like a key"
        );
    }
}

#[test]
fn builtin_names_placeholders_env_vars_and_hosts_are_unique() {
    let catalog = Catalog::builtin();
    let mut names = HashSet::new();
    let mut placeholders = HashSet::new();
    let mut env = HashSet::new();
    let mut hosts = HashSet::new();
    for p in catalog.providers() {
        assert!(names.insert(p.name.clone()), "name {}", p.name);
        assert!(
            placeholders.insert(p.placeholder.clone()),
            "placeholder of {}",
            p.name
        );
        for v in &p.env {
            assert!(env.insert(v.clone()), "env {v}");
        }
        for h in p.host_patterns() {
            assert!(hosts.insert(h.to_string()), "host {h}");
        }
    }
    assert_eq!(catalog.host_patterns().len(), hosts.len());
}

#[test]
fn route_for_host_finds_every_builtin_host_and_nothing_else() {
    let catalog = Catalog::builtin();
    for p in catalog.providers() {
        for (i, route) in p.routes.iter().enumerate() {
            for spec in &route.hosts {
                // A wildcard is exercised with one concrete label in its place.
                let host = match spec.pattern.strip_prefix("*.") {
                    Some(domain) => format!("res1.{domain}"),
                    None => spec.pattern.clone(),
                };
                let (found, found_route) = catalog.route_for_host(&host).expect("host is routed");
                assert_eq!(found.name, p.name, "{}", spec.pattern);
                assert_eq!(found_route, &p.routes[i]);
                // Case and a trailing dot do not matter.
                let upper = format!("{}.", host.to_ascii_uppercase());
                assert_eq!(
                    catalog.route_for_host(&upper).map(|(p, _)| &p.name),
                    Some(&p.name)
                );
            }
        }
    }
    for foreign in [
        "api.openai.com.evil.test",
        "evil.test",
        "openai.com",
        "x.api.openai.com",
        "openai.azure.com",
        "a.b.openai.azure.com",
        "*.openai.azure.com",
        "",
    ] {
        assert!(catalog.route_for_host(foreign).is_none(), "{foreign}");
    }
    let (gh, route) = catalog.route_for_host("github.com").expect("github.com");
    assert_eq!(gh.name, "github");
    assert_eq!(route.inject, InjectMode::Always);
    assert_eq!(
        route.credential,
        vec![Injection::Header {
            name: "authorization".into(),
            scheme: Some(Scheme::Basic {
                username: Some("x-access-token".into())
            }),
        }]
    );
    let (_, api) = catalog
        .route_for_host("api.github.com")
        .expect("api.github.com");
    assert_eq!(api.inject, InjectMode::IfPlaceholder);
    let (_, gemini) = catalog
        .route_for_host("generativelanguage.googleapis.com")
        .expect("gemini");
    assert!(gemini.credential.contains(&Injection::Query {
        param: "key".into()
    }));
    assert!(gemini.credential.contains(&Injection::Header {
        name: "x-goog-api-key".into(),
        scheme: None
    }));
}

/// Keys in each provider's real format (built at run time so that no key-like text is in the
/// repository) are accepted; other shapes are not.
#[test]
fn builtin_key_patterns_accept_real_formats() {
    let catalog = Catalog::builtin();
    let a = |n: usize| "aB3".repeat(n).chars().take(n).collect::<String>();
    let hex = |n: usize| "0f9e".repeat(n).chars().take(n).collect::<String>();
    let ok: Vec<(&str, String)> = vec![
        ("openai", format!("sk-proj-{}", a(48))),
        ("openai", format!("sk-{}", a(48))),
        ("anthropic", format!("sk-ant-api03-{}-{}AA", a(40), a(50))),
        ("anthropic", format!("sk-ant-oat01-{}", a(80))),
        ("github", format!("ghp_{}", a(36))),
        ("github", format!("gho_{}", a(36))),
        ("github", format!("ghs_{}", a(36))),
        ("github", format!("github_pat_{}_{}", a(22), a(59))),
        ("github", hex(40)),
        ("gitlab", format!("glpat-{}", a(20))),
        ("gitlab", hex(64)),
        ("stripe", format!("sk_live_{}", a(99))),
        ("stripe", format!("rk_test_{}", a(24))),
        ("slack", format!("xoxb-1234-5678-{}", a(24))),
        ("slack", format!("xoxe.xoxp-1-{}", a(60))),
        ("linear", format!("lin_api_{}", a(40))),
        ("linear", format!("lin_oauth_{}", hex(64))),
        ("gemini", format!("AIza{}", a(35))),
        ("mistral", a(32)),
        ("groq", format!("gsk_{}", a(52))),
        ("openrouter", format!("sk-or-v1-{}", hex(64))),
        ("huggingface", format!("hf_{}", a(34))),
        ("cohere", a(40)),
        ("deepseek", format!("sk-{}", hex(32))),
        ("xai", format!("xai-{}", a(80))),
        ("perplexity", format!("pplx-{}", a(48))),
        ("together", format!("tgp_v1_{}", a(43))),
        ("together", hex(64)),
        ("fireworks", format!("fw_{}", a(24))),
        ("notion", format!("ntn_{}", a(46))),
        ("notion", format!("secret_{}", a(43))),
        ("sentry", format!("sntryu_{}", hex(64))),
        ("sentry", format!("sntrys_eyJ{}=_{}", a(100), a(43))),
        ("replicate", format!("r8_{}", a(37))),
        ("cerebras", format!("csk-{}", a(48))),
        ("azure-openai", hex(32)),
        ("azure-openai", a(84)),
    ];
    for (name, key) in &ok {
        let p = catalog.get(name).expect("provider");
        assert!(
            p.key_matches(key),
            "{name} rejects a key of a real format ({} chars)",
            key.len()
        );
    }
    let bad: Vec<(&str, String)> = vec![
        ("openai", "sk-short".into()),
        ("openai", format!(" sk-{}", a(40))),
        ("openai", format!("sk-{}\n", a(40))),
        ("anthropic", format!("sk-{}", a(40))),
        ("github", format!("ghx_{}", a(36))),
        ("stripe", format!("pk_live_{}", a(24))),
        ("gemini", format!("AIzb{}", a(35))),
        ("slack", format!("xoxb {}", a(20))),
    ];
    for (name, key) in &bad {
        assert!(
            !catalog.get(name).expect("provider").key_matches(key),
            "{name} accepts {key:?}"
        );
    }
}

#[test]
fn custom_file_parses_with_defaults() {
    let p = parse(ACME).expect("parses");
    assert_eq!(p.auth, AuthKind::ApiKey);
    assert_eq!(p.routes[0].inject, InjectMode::IfPlaceholder);
    assert_eq!(
        p.routes[0].hosts,
        vec![
            HostSpec {
                pattern: "api.acme.test".into(),
                port: 443,
                path_prefix: None
            },
            HostSpec {
                pattern: "*.acme.example".into(),
                port: 443,
                path_prefix: None
            },
            HostSpec {
                pattern: "upload.acme.test".into(),
                port: 8443,
                path_prefix: Some("/v1".into())
            },
        ]
    );
    assert_eq!(
        p.routes[0].credential,
        vec![
            Injection::Header {
                name: "x-acme-key".into(),
                scheme: None
            },
            Injection::Query {
                param: "api_key".into()
            },
        ]
    );
    assert!(p.oauth.is_none());
    assert_eq!(
        p.origin().to_string(),
        "/home/u/.local/share/broker/providers/acme.toml"
    );
}

#[test]
fn typo_in_a_field_names_file_line_and_field() {
    let text = ACME.replace("{ header = \"x-acme-key\" }", "{ heder = \"x-acme-key\" }");
    let msg = err(&text);
    assert!(
        msg.starts_with("/home/u/.local/share/broker/providers/acme.toml:9:17: unknown field 'heder', expected one of"),
        "{msg}"
    );
    let msg = err(&ACME.replace("display_name", "displayname"));
    assert!(
        msg.starts_with(
            "/home/u/.local/share/broker/providers/acme.toml:2:1: unknown field 'displayname'"
        ),
        "{msg}"
    );
    // An unknown value of a known field names the field.
    let msg = err(&format!("{ACME}inject = \"sometimes\"\n"));
    assert!(
        msg.contains("acme.toml:10:10: field 'inject': unknown variant 'sometimes'"),
        "{msg}"
    );
    let msg = err(&ACME.replace(
        "{ header = \"x-acme-key\" }",
        "{ header = \"x-acme-key\", scheme = \"berer\" }",
    ));
    assert!(
        msg.contains("acme.toml:9:") && msg.contains("field 'scheme': unknown variant 'berer'"),
        "{msg}"
    );
    // A value of the wrong type.
    let msg = err(&ACME.replace("env = [\"ACME_API_KEY\"]", "env = \"ACME_API_KEY\""));
    assert!(
        msg.contains("acme.toml:3:7: field 'env': invalid type"),
        "{msg}"
    );
    // A missing required field.
    let msg = err(&ACME.replace("key_pattern = '^acme_[a-z0-9_]{20,}$'\n", ""));
    assert!(
        msg.contains("acme.toml") && msg.contains("missing field 'key_pattern'"),
        "{msg}"
    );
}

#[test]
fn bad_toml_syntax_names_file_and_line() {
    let msg = err(&ACME.replace(
        "placeholder = \"acme_broker_placeholder_0000\"",
        "placeholder = \"acme_broker",
    ));
    assert!(
        msg.starts_with("/home/u/.local/share/broker/providers/acme.toml:4:"),
        "{msg}"
    );
    let msg = err(&ACME.replace("[[routes]]", "[[routes]"));
    assert!(
        msg.starts_with("/home/u/.local/share/broker/providers/acme.toml:7:"),
        "{msg}"
    );
}

#[test]
fn bad_regex_names_the_field_and_line() {
    let msg = err(&ACME.replace("'^acme_[a-z0-9_]{20,}$'", "'^acme_[a-z0-9_{20,}$'"));
    assert!(
        msg.starts_with("/home/u/.local/share/broker/providers/acme.toml:5:15: field 'key_pattern': invalid regex"),
        "{msg}"
    );
    let msg = err(&ACME.replace("'^acme_[a-z0-9_]{20,}$'", "''"));
    assert!(
        msg.contains(":5:15: field 'key_pattern': must not be empty"),
        "{msg}"
    );
}

#[test]
fn placeholder_must_match_the_key_pattern() {
    let msg = err(&ACME.replace(
        "acme_broker_placeholder_0000",
        "acme-broker-placeholder-0000",
    ));
    assert!(
        msg.starts_with("/home/u/.local/share/broker/providers/acme.toml:4:15: field 'placeholder': 'acme-broker-placeholder-0000' does not match key_pattern"),
        "{msg}"
    );
    let msg = err(&ACME.replace("acme_broker_placeholder_0000", "acme_short"));
    assert!(
        msg.contains(":4:15: field 'placeholder': must be at least 16 characters"),
        "{msg}"
    );
    // Characters that a URL or a Basic credential would mangle.
    let text = ACME
        .replace(
            "acme_broker_placeholder_0000",
            "acme_broker_placeholder:0000",
        )
        .replace("[a-z0-9_]", "[a-z0-9_:]");
    assert!(
        err(&text).contains("field 'placeholder': may only contain"),
        "{}",
        err(&text)
    );
}

#[test]
fn bad_hosts_ports_and_routes_are_refused_with_their_line() {
    let bad_host = |h: &str| err(&ACME.replace("\"api.acme.test\"", &format!("\"{h}\"")));
    for (host, why) in [
        ("*.*.x", "'*' is allowed only as the whole first label"),
        ("", "empty host"),
        ("*.com", "a wildcard needs a domain of at least two labels"),
        ("api.acme.test:0", "port 0 is not a port"),
        ("api.acme.test:99999", "bad port"),
        ("api..acme.test", "is not a valid host name label"),
        ("a*.acme.test", "'*' is allowed only"),
        ("api.acme.test/", "a path prefix is"),
    ] {
        let msg = bad_host(host);
        assert!(
            msg.contains(":8:10: field 'routes.hosts': "),
            "{host}: {msg}"
        );
        assert!(msg.contains(why), "{host}: {msg}");
    }
    let msg = err(&ACME.replace("\"upload.acme.test:8443/v1\"", "\"API.acme.test\""));
    assert!(
        msg.contains("field 'routes.hosts': 'api.acme.test' is listed twice"),
        "{msg}"
    );

    let no_routes = ACME.split("[[routes]]").next().expect("head").to_string() + "routes = []\n";
    let msg = err(&no_routes);
    assert!(
        msg.contains(":7:10: field 'routes': at least one route is needed"),
        "{msg}"
    );
    let msg = err(&ACME.replace(
        "credential = [{ header = \"x-acme-key\" }, { query = \"api_key\" }]",
        "credential = []",
    ));
    assert!(
        msg.contains(":9:14: field 'routes.credential': at least one place"),
        "{msg}"
    );
}

#[test]
fn bad_injections_are_refused() {
    let with = |c: &str| err(&ACME.replace("{ header = \"x-acme-key\" }", c));
    let msg = with("{ header = \"authorization\", scheme = \"basic\", basic_username = \"a:b\" }");
    assert!(
        msg.contains(
            ":9:15: field 'routes.credential.basic_username': 'a:b' cannot be a Basic user name"
        ),
        "{msg}"
    );
    let msg = with("{ header = \"authorization\", basic_username = \"x\" }");
    assert!(
        msg.contains("field 'routes.credential.basic_username': only with scheme = \"basic\""),
        "{msg}"
    );
    let msg = with("{ header = \"host\" }");
    assert!(msg.contains("'host' cannot carry a credential"), "{msg}");
    let msg = with("{ header = \"x api\" }");
    assert!(msg.contains("is not a valid header name"), "{msg}");
    let msg = with("{ query = \"key\", scheme = \"bearer\" }");
    assert!(msg.contains("a query parameter takes no scheme"), "{msg}");
    let msg = with("{ query = \"key\", header = \"x-key\" }");
    assert!(msg.contains("not both"), "{msg}");
    let msg = with("{ }");
    assert!(msg.contains("give 'header'"), "{msg}");
    let always = ACME.replace(
        "credential = [{ header = \"x-acme-key\" }, { query = \"api_key\" }]",
        "credential = [{ header = \"authorization\", scheme = \"basic\" }]\ninject = \"always\"",
    );
    let msg = err(&always);
    assert!(
        msg.contains(":9:14: field 'routes.credential.basic_username': inject = \"always\""),
        "{msg}"
    );
    let named = always.replace(
        "scheme = \"basic\"",
        "scheme = \"basic\", basic_username = \"x\"",
    );
    assert_eq!(
        parse(&named).expect("parses").routes[0].inject,
        InjectMode::Always
    );
    // Header names are stored lowercase.
    let p = parse(&ACME.replace("x-acme-key", "X-Acme-Key")).expect("parses");
    assert_eq!(
        p.routes[0].credential[0],
        Injection::Header {
            name: "x-acme-key".into(),
            scheme: None
        }
    );
}

#[test]
fn oauth_tables_are_checked() {
    let msg = err(&ACME.replace("key_pattern", "auth = \"oauth2\"\nkey_pattern"));
    assert!(
        msg.contains(":5:8: field 'auth': auth = \"oauth2\" needs an [oauth] table"),
        "{msg}"
    );
    let with_oauth = |o: &str| format!("{ACME}\n[oauth]\n{o}\n");
    let p = parse(&with_oauth(
        "authorize_url = \"https://acme.test/authorize\"\ntoken_url = \"https://acme.test/token\"\nscopes = [\"read\"]",
    ))
    .expect("parses");
    let o = p.oauth.expect("oauth");
    assert_eq!(o.grant, Grant::AuthorizationCode);
    assert_eq!(o.client_auth, ClientAuth::Post);
    assert!(!o.device_flow);
    let p = parse(&with_oauth("token_url = \"https://acme.test/token\"\ngrant = \"client_credentials\"\nclient_auth = \"basic\""))
        .expect("client credentials need no authorize_url");
    assert_eq!(p.oauth.expect("oauth").grant, Grant::ClientCredentials);
    let msg = err(&with_oauth(
        "token_url = \"https://acme.test/token\"\ndevice_flow = true",
    ));
    assert!(
        msg.contains("field 'oauth.device_flow': device_flow = true needs a device_url"),
        "{msg}"
    );
    let msg = err(&with_oauth(
        "token_url = \"http://acme.test/token\"\nauthorize_url = \"https://acme.test/a\"",
    ));
    assert!(
        msg.contains("field 'oauth.token_url': 'http://acme.test/token' must use https"),
        "{msg}"
    );
    let msg = err(&with_oauth("authorize_url = \"https://acme.test/a\""));
    assert!(msg.contains("field 'oauth.token_url': missing"), "{msg}");
    let msg = err(&with_oauth(
        "token_url = \"https://acme.test/token\"\nauthorise_url = \"https://acme.test/a\"",
    ));
    assert!(msg.contains("unknown field 'authorise_url'"), "{msg}");
}

#[test]
fn names_and_env_vars_are_checked() {
    let msg = err(&ACME.replace("name = \"acme\"", "name = \"Acme Corp\""));
    assert!(
        msg.contains(":1:8: field 'name': 'Acme Corp' is not a valid provider name"),
        "{msg}"
    );
    let msg = err(&ACME.replace("[\"ACME_API_KEY\"]", "[\"ACME_API_KEY\", \"ACME-KEY\"]"));
    assert!(
        msg.contains(":3:24: field 'env': 'ACME-KEY' is not a valid environment variable name"),
        "{msg}"
    );
    let msg = err(&ACME.replace("[\"ACME_API_KEY\"]", "[\"ACME_API_KEY\", \"ACME_API_KEY\"]"));
    assert!(msg.contains("'ACME_API_KEY' is listed twice"), "{msg}");
}

#[test]
fn two_providers_claiming_one_host_is_an_error_naming_both() {
    let acme = parse(ACME).expect("parses");
    let other_text = ACME
        .replace("name = \"acme\"", "name = \"acme2\"")
        .replace("ACME_API_KEY", "ACME2_API_KEY")
        .replace(
            "acme_broker_placeholder_0000",
            "acme_broker_placeholder_0002",
        )
        .replace("\"api.acme.test\", ", "");
    let other = Provider::from_toml(&other_text, "/p/acme2.toml").expect("parses");
    let e = Catalog::from_parts(vec![acme.clone(), other])
        .expect_err("conflict")
        .to_string();
    assert_eq!(
        e,
        "/p/acme2.toml:8: field 'hosts': host '*.acme.example' is claimed by both 'acme' \
         (/home/u/.local/share/broker/providers/acme.toml) and 'acme2'"
    );
    // Same placeholder, same env var, same name.
    let same_ph = Provider::from_toml(
        &ACME
            .replace("name = \"acme\"", "name = \"acme3\"")
            .replace("ACME_API_KEY", "ACME3")
            .replace("acme.", "acme3."),
        "/p/acme3.toml",
    )
    .expect("parses");
    let e = Catalog::from_parts(vec![acme.clone(), same_ph])
        .expect_err("conflict")
        .to_string();
    assert!(
        e.contains("/p/acme3.toml:4: field 'placeholder': providers 'acme'")
            && e.contains("'acme3' have the same placeholder"),
        "{e}"
    );
    let e = Catalog::from_parts(vec![acme.clone(), acme])
        .expect_err("conflict")
        .to_string();
    assert!(
        e.contains("field 'name': provider 'acme' is also defined in"),
        "{e}"
    );
}

#[test]
fn exact_host_wins_over_wildcard() {
    let wild = parse(ACME).expect("parses");
    let exact = Provider::from_toml(
        r#"name = "special"
placeholder = "special_broker_placeholder_0"
key_pattern = '^special_[a-z_0-9]+$'
[[routes]]
hosts = ["eu.acme.example"]
credential = [{ header = "authorization", scheme = "token" }]
"#,
        "/p/special.toml",
    )
    .expect("parses");
    let catalog = Catalog::from_parts(vec![wild, exact])
        .expect("an exact host may sit under another's wildcard");
    assert_eq!(
        catalog
            .route_for_host("eu.acme.example")
            .map(|(p, _)| p.name.as_str()),
        Some("special")
    );
    assert_eq!(
        catalog
            .route_for_host("us.acme.example")
            .map(|(p, _)| p.name.as_str()),
        Some("acme")
    );
    assert_eq!(catalog.route_for_host("acme.example"), None);
    assert_eq!(
        catalog
            .route_for_host("upload.acme.test")
            .map(|(p, _)| p.name.as_str()),
        Some("acme")
    );
    assert_eq!(
        catalog.host_patterns(),
        vec![
            "api.acme.test",
            "*.acme.example",
            "upload.acme.test",
            "eu.acme.example"
        ]
    );
    assert_eq!(
        catalog.get("special").map(|p| p.display_name.as_str()),
        Some("special")
    );
}

fn home_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Home) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::at(dir.path().to_path_buf());
    std::fs::create_dir_all(home.providers_dir()).expect("mkdir");
    for (name, text) in files {
        std::fs::write(home.providers_dir().join(name), text).expect("write");
    }
    (dir, home)
}

#[test]
fn load_without_a_providers_dir_is_the_builtin_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::at(dir.path().join("missing"));
    let catalog = Catalog::load(&home).expect("loads");
    assert_eq!(catalog.providers(), Catalog::builtin().providers());
}

#[test]
fn custom_file_overrides_a_builtin() {
    let openai = Catalog::builtin()
        .get("openai")
        .expect("openai")
        .source_text()
        .to_string();
    let custom = openai
        .replace("hosts = [\"api.openai.com\"]", "hosts = [\"api.openai.com\", \"*.oai-gateway.example\"]")
        .replace("display_name = \"OpenAI\"", "display_name = \"OpenAI (mine)\"")
        .replace(
            "credential = [{ header = \"authorization\", scheme = \"bearer\" }]",
            "credential = [{ header = \"authorization\", scheme = \"bearer\" }, { header = \"api-key\" }]",
        );
    let (_dir, home) = home_with(&[
        ("openai.toml", &custom),
        ("notes.txt", "not a provider"),
        (".openai.toml.swp", "x"),
    ]);
    let catalog = Catalog::load(&home).expect("loads");
    assert_eq!(
        catalog.providers().len(),
        Catalog::builtin().providers().len()
    );
    let p = catalog.get("openai").expect("openai");
    assert_eq!(p.display_name, "OpenAI (mine)");
    assert!(!p.origin().is_builtin());
    assert_eq!(
        p.origin(),
        &Origin::File(home.providers_dir().join("openai.toml"))
    );
    // Same position as the built-in it replaces.
    assert_eq!(catalog.providers()[0].name, "openai");
    let (found, route) = catalog
        .route_for_host("eu.oai-gateway.example")
        .expect("routed");
    assert_eq!(found.name, "openai");
    assert!(route.credential.contains(&Injection::Header {
        name: "api-key".into(),
        scheme: None
    }));
}

#[test]
fn custom_provider_for_a_new_host() {
    let (_dir, home) = home_with(&[("acme.toml", ACME)]);
    let catalog = Catalog::load(&home).expect("loads");
    assert_eq!(
        catalog.providers().len(),
        Catalog::builtin().providers().len() + 1
    );
    let (p, route) = catalog.route_for_host("api.acme.test").expect("routed");
    assert_eq!(p.name, "acme");
    assert_eq!(route.hosts[0].pattern, "api.acme.test");
    assert!(catalog
        .host_patterns()
        .contains(&"api.acme.test".to_string()));
    assert!(catalog.route_for_host("api.openai.com").is_some());
}

#[test]
fn load_reports_a_malformed_custom_file_by_path() {
    let bad = ACME.replace("{ header = \"x-acme-key\" }", "{ heder = \"x-acme-key\" }");
    let (_dir, home) = home_with(&[("acme.toml", &bad)]);
    let msg = Catalog::load(&home).expect_err("malformed").to_string();
    let path = home.providers_dir().join("acme.toml");
    assert!(
        msg.starts_with(&format!("{}:9:17: unknown field 'heder'", path.display())),
        "{msg}"
    );
}

#[test]
fn load_refuses_a_custom_provider_taking_a_builtin_host_or_a_duplicate_name() {
    let thief = ACME.replace("\"api.acme.test\"", "\"api.openai.com\"");
    let (_dir, home) = home_with(&[("acme.toml", &thief)]);
    let msg = Catalog::load(&home).expect_err("conflict").to_string();
    let path = home.providers_dir().join("acme.toml");
    assert_eq!(
        msg,
        format!(
            "{}:8: field 'hosts': host 'api.openai.com' is claimed by both 'openai' (<built-in>/openai.toml) and 'acme'",
            path.display()
        )
    );
    let (_dir, home) = home_with(&[("a.toml", ACME), ("b.toml", ACME)]);
    let msg = Catalog::load(&home).expect_err("duplicate").to_string();
    assert!(
        msg.contains("b.toml:1: field 'name': provider 'acme' is also defined in")
            && msg.contains("a.toml"),
        "{msg}"
    );
}

#[test]
fn host_spec_string_forms() {
    assert_eq!(
        HostSpec::parse("api.example.com").expect("ok"),
        HostSpec {
            pattern: "api.example.com".into(),
            port: 443,
            path_prefix: None
        }
    );
    assert_eq!(
        HostSpec::parse("*.Example.com.").expect("ok").pattern,
        "*.example.com"
    );
    assert_eq!(
        HostSpec::parse("api.example.com:8443").expect("ok").port,
        8443
    );
    let spec = HostSpec::parse("example.com/api").expect("ok");
    assert_eq!(spec.path_prefix.as_deref(), Some("/api"));
    assert_eq!(spec.to_string(), "example.com/api");
    assert_eq!(
        HostSpec::parse("localhost:8080/v1/")
            .expect("ok")
            .to_string(),
        "localhost:8080/v1/"
    );
    assert!(HostSpec::parse("*").is_err());
    assert!(HostSpec::parse(":443").is_err());
    assert!(HostSpec::parse("exa mple.com").is_err());
    assert!(HostSpec::parse("-bad.example.com").is_err());
}

#[test]
fn builtin_sources_are_the_compiled_files() {
    for (file, text) in BUILTIN {
        let catalog = Catalog::builtin();
        let p = catalog.get(file).expect("provider");
        assert_eq!(p.source_text(), *text);
        assert_eq!(p.origin(), &Origin::Builtin(file));
        assert!(Path::new(&format!(
            "{}/src/providers/builtin/{file}.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .exists());
    }
}

/// Every occurrence of every placeholder, by looking at every byte: what the index must find.
fn placeholders_at_every_byte(catalog: &Catalog, haystack: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    for at in 0..haystack.len() {
        for (i, p) in catalog.providers().iter().enumerate() {
            if !p.placeholder.is_empty() && haystack[at..].starts_with(p.placeholder.as_bytes()) {
                found.push(i);
            }
        }
    }
    found.sort_unstable();
    found
}

proptest::proptest! {
    /// The built-in catalog's placeholders (and prefixes of them, and one-byte and overlapping
    /// ones in a catalog of its own), mixed with noise: the index finds each occurrence.
    #[test]
    fn the_index_finds_what_a_look_at_every_byte_finds(
        pieces in proptest::collection::vec(
            (0usize..200, 0usize..64, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6)),
            0..8,
        ),
        small in proptest::prelude::any::<bool>(),
    ) {
        let builtin = Catalog::builtin();
        let catalog = if small {
            let mut a = parse(ACME).expect("acme");
            a.placeholder = "ab".into();
            let mut b = parse(ACME).expect("acme");
            b.name = "acme-b".into();
            b.placeholder = "a".into();
            let mut c = parse(ACME).expect("acme");
            c.name = "acme-c".into();
            c.placeholder = "abab".into();
            Catalog::new(vec![a, b, c])
        } else {
            builtin.clone()
        };
        let placeholders: Vec<&str> =
            catalog.providers().iter().map(|p| p.placeholder.as_str()).collect();
        let mut haystack = Vec::new();
        for (which, cut, noise) in pieces {
            let p = placeholders[which % placeholders.len()].as_bytes();
            // Whole, or cut short (a prefix must not be found).
            let keep = if cut % 3 == 0 { p.len().saturating_sub(cut % 5) } else { p.len() };
            haystack.extend_from_slice(&p[..keep]);
            haystack.extend_from_slice(&noise);
        }
        let mut owners = Vec::new();
        catalog.placeholders_in(&haystack, &mut owners);
        owners.sort_unstable();
        proptest::prop_assert_eq!(owners, placeholders_at_every_byte(&catalog, &haystack));
    }
}

#[test]
fn placeholder_index_marks_every_provider_whose_placeholder_occurs() {
    let mut short = parse(ACME).expect("acme");
    short.placeholder = "acme_broker_placeholder_0000".into();
    let mut long = parse(ACME).expect("acme");
    long.name = "acme-long".into();
    // Contains the other one: both must be found in a value holding the long one.
    long.placeholder = "x-acme_broker_placeholder_0000-long".into();
    let mut none = parse(ACME).expect("acme");
    none.name = "acme-none".into();
    none.placeholder = String::new();
    // Shorter than the parser allows, but the index must not depend on that: a one-byte
    // placeholder may be the haystack's last byte.
    let mut one = parse(ACME).expect("acme");
    one.name = "acme-one".into();
    one.placeholder = "z".into();
    // A placeholder that is the whole value or ends it is found.
    let two = Catalog::new(vec![short.clone(), long.clone()]);
    let marks_two = |haystack: &str| {
        let mut owners = Vec::new();
        two.placeholders_in(haystack.as_bytes(), &mut owners);
        [0, 1].map(|i| owners.contains(&i))
    };
    assert_eq!(marks_two("acme_broker_placeholder_0000"), [true, false]);
    assert_eq!(
        marks_two("Bearer acme_broker_placeholder_0000"),
        [true, false]
    );
    assert_eq!(
        marks_two("x-acme_broker_placeholder_0000-long"),
        [true, true]
    );
    assert_eq!(marks_two("acme_broker_placeholder_000"), [false, false]);
    let catalog = Catalog::new(vec![short, long, none, one]);
    let marks = |haystack: &str| {
        let mut owners = Vec::new();
        catalog.placeholders_in(haystack.as_bytes(), &mut owners);
        [0, 1, 2, 3].map(|i| owners.contains(&i))
    };
    assert_eq!(
        marks("Bearer acme_broker_placeholder_0000"),
        [true, false, false, false]
    );
    assert_eq!(
        marks("x-acme_broker_placeholder_0000-long"),
        [true, true, false, false]
    );
    assert_eq!(
        marks("acme_broker_placeholder_0000acme_broker_placeholder_000"),
        [true, false, false, false]
    );
    assert_eq!(
        marks("acme_broker_placeholder_000"),
        [false, false, false, false]
    );
    assert_eq!(marks("az"), [false, false, false, true]);
    assert_eq!(marks("za"), [false, false, false, true]);
    assert_eq!(
        marks("Bearer acme_broker_placeholder_0000z"),
        [true, false, false, true]
    );
    assert_eq!(marks("a"), [false, false, false, false]);
    assert_eq!(marks(""), [false, false, false, false]);
}

/// Found by the property tests (fuzz/tests/props.rs): a file with a non-ASCII character just
/// before a key made the error's "which key" lookup slice inside that character and panic.
#[test]
fn errors_in_files_with_non_ascii_text_are_reported_not_panics() {
    let err = parse("\"\u{b01}=A ").expect_err("not a provider");
    assert!(!err.to_string().is_empty());
    let err = parse("name = \"é\"\nplaceholder=ü").expect_err("not a provider");
    assert!(
        err.to_string().contains(":2:") && err.to_string().contains("placeholder"),
        "{err}"
    );
}

/// Every wildcard host of a built-in, and why a key may go to any one label under it: the
/// labels there are the provider's own endpoints or its customers' resources on the
/// provider's own service, where no customer runs code that could read a request. A wildcard
/// under a domain where customers do run code (`*.supabase.co`, `*.vercel.app`,
/// `*.workers.dev`, `*.herokuapp.com`) would hand the key to whoever names a project there:
/// such APIs are custom providers for one host. Adding a wildcard means adding it here.
const REVIEWED_WILDCARDS: &[(&str, &str)] = &[
    (
        "*.openai.azure.com",
        "Azure OpenAI resources: <resource>.openai.azure.com",
    ),
    (
        "*.cognitiveservices.azure.com",
        "Azure AI services resources",
    ),
    (
        "*.api.mailchimp.com",
        "Mailchimp's data centres: us1.api.mailchimp.com",
    ),
    (
        "*.algolia.net",
        "Algolia application hosts: <APPID>-dsn.algolia.net",
    ),
    (
        "*.algolianet.com",
        "Algolia's fallback hosts: <APPID>-1.algolianet.com",
    ),    (
        "*.s3.amazonaws.com",
        "S3 buckets by their global name (AWS's storage service, no customer code)",
    ),
    (
        "*.us-east-1.amazonaws.com",
        "AWS service endpoints in us-east-1: <service>.us-east-1, <service>-fips.us-east-1",
    ),
    (
        "*.s3.us-east-1.amazonaws.com",
        "S3 buckets in us-east-1, by virtual-host name",
    ),
    (
        "*.us-east-2.amazonaws.com",
        "AWS service endpoints in us-east-2: <service>.us-east-2, <service>-fips.us-east-2",
    ),
    (
        "*.s3.us-east-2.amazonaws.com",
        "S3 buckets in us-east-2, by virtual-host name",
    ),
    (
        "*.us-west-1.amazonaws.com",
        "AWS service endpoints in us-west-1: <service>.us-west-1, <service>-fips.us-west-1",
    ),
    (
        "*.s3.us-west-1.amazonaws.com",
        "S3 buckets in us-west-1, by virtual-host name",
    ),
    (
        "*.us-west-2.amazonaws.com",
        "AWS service endpoints in us-west-2: <service>.us-west-2, <service>-fips.us-west-2",
    ),
    (
        "*.s3.us-west-2.amazonaws.com",
        "S3 buckets in us-west-2, by virtual-host name",
    ),
    (
        "*.ca-central-1.amazonaws.com",
        "AWS service endpoints in ca-central-1: <service>.ca-central-1, <service>-fips.ca-central-1",
    ),
    (
        "*.s3.ca-central-1.amazonaws.com",
        "S3 buckets in ca-central-1, by virtual-host name",
    ),
    (
        "*.eu-west-1.amazonaws.com",
        "AWS service endpoints in eu-west-1: <service>.eu-west-1, <service>-fips.eu-west-1",
    ),
    (
        "*.s3.eu-west-1.amazonaws.com",
        "S3 buckets in eu-west-1, by virtual-host name",
    ),
    (
        "*.eu-west-2.amazonaws.com",
        "AWS service endpoints in eu-west-2: <service>.eu-west-2, <service>-fips.eu-west-2",
    ),
    (
        "*.s3.eu-west-2.amazonaws.com",
        "S3 buckets in eu-west-2, by virtual-host name",
    ),
    (
        "*.eu-west-3.amazonaws.com",
        "AWS service endpoints in eu-west-3: <service>.eu-west-3, <service>-fips.eu-west-3",
    ),
    (
        "*.s3.eu-west-3.amazonaws.com",
        "S3 buckets in eu-west-3, by virtual-host name",
    ),
    (
        "*.eu-central-1.amazonaws.com",
        "AWS service endpoints in eu-central-1: <service>.eu-central-1, <service>-fips.eu-central-1",
    ),
    (
        "*.s3.eu-central-1.amazonaws.com",
        "S3 buckets in eu-central-1, by virtual-host name",
    ),
    (
        "*.eu-north-1.amazonaws.com",
        "AWS service endpoints in eu-north-1: <service>.eu-north-1, <service>-fips.eu-north-1",
    ),
    (
        "*.s3.eu-north-1.amazonaws.com",
        "S3 buckets in eu-north-1, by virtual-host name",
    ),
    (
        "*.ap-northeast-1.amazonaws.com",
        "AWS service endpoints in ap-northeast-1: <service>.ap-northeast-1, <service>-fips.ap-northeast-1",
    ),
    (
        "*.s3.ap-northeast-1.amazonaws.com",
        "S3 buckets in ap-northeast-1, by virtual-host name",
    ),
    (
        "*.ap-southeast-1.amazonaws.com",
        "AWS service endpoints in ap-southeast-1: <service>.ap-southeast-1, <service>-fips.ap-southeast-1",
    ),
    (
        "*.s3.ap-southeast-1.amazonaws.com",
        "S3 buckets in ap-southeast-1, by virtual-host name",
    ),
    (
        "*.ap-southeast-2.amazonaws.com",
        "AWS service endpoints in ap-southeast-2: <service>.ap-southeast-2, <service>-fips.ap-southeast-2",
    ),
    (
        "*.s3.ap-southeast-2.amazonaws.com",
        "S3 buckets in ap-southeast-2, by virtual-host name",
    ),
    (
        "*.ap-south-1.amazonaws.com",
        "AWS service endpoints in ap-south-1: <service>.ap-south-1, <service>-fips.ap-south-1",
    ),
    (
        "*.s3.ap-south-1.amazonaws.com",
        "S3 buckets in ap-south-1, by virtual-host name",
    ),
    (
        "*.sa-east-1.amazonaws.com",
        "AWS service endpoints in sa-east-1: <service>.sa-east-1, <service>-fips.sa-east-1",
    ),
    (
        "*.s3.sa-east-1.amazonaws.com",
        "S3 buckets in sa-east-1, by virtual-host name",
    ),
    (
        "*.s3.dualstack.us-east-1.amazonaws.com",
        "S3 buckets in us-east-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.us-east-2.amazonaws.com",
        "S3 buckets in us-east-2, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.us-west-1.amazonaws.com",
        "S3 buckets in us-west-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.us-west-2.amazonaws.com",
        "S3 buckets in us-west-2, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.ca-central-1.amazonaws.com",
        "S3 buckets in ca-central-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.eu-west-1.amazonaws.com",
        "S3 buckets in eu-west-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.eu-west-2.amazonaws.com",
        "S3 buckets in eu-west-2, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.eu-west-3.amazonaws.com",
        "S3 buckets in eu-west-3, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.eu-central-1.amazonaws.com",
        "S3 buckets in eu-central-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.eu-north-1.amazonaws.com",
        "S3 buckets in eu-north-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.ap-northeast-1.amazonaws.com",
        "S3 buckets in ap-northeast-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.ap-southeast-1.amazonaws.com",
        "S3 buckets in ap-southeast-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.ap-southeast-2.amazonaws.com",
        "S3 buckets in ap-southeast-2, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.ap-south-1.amazonaws.com",
        "S3 buckets in ap-south-1, by dual-stack virtual-host name",
    ),
    (
        "*.s3.dualstack.sa-east-1.amazonaws.com",
        "S3 buckets in sa-east-1, by dual-stack virtual-host name",
    ),
    (
        "*.us-gov-west-1.amazonaws.com",
        "AWS GovCloud service endpoints in us-gov-west-1: <service>.us-gov-west-1, <service>-fips.us-gov-west-1",
    ),
    (
        "*.s3.us-gov-west-1.amazonaws.com",
        "S3 buckets in GovCloud us-gov-west-1, by virtual-host name",
    ),
    (
        "*.s3.dualstack.us-gov-west-1.amazonaws.com",
        "S3 buckets in GovCloud us-gov-west-1, by dual-stack virtual-host name",
    ),
    (
        "*.us-gov-east-1.amazonaws.com",
        "AWS GovCloud service endpoints in us-gov-east-1: <service>.us-gov-east-1, <service>-fips.us-gov-east-1",
    ),
    (
        "*.s3.us-gov-east-1.amazonaws.com",
        "S3 buckets in GovCloud us-gov-east-1, by virtual-host name",
    ),
    (
        "*.s3.dualstack.us-gov-east-1.amazonaws.com",
        "S3 buckets in GovCloud us-gov-east-1, by dual-stack virtual-host name",
    ),
    (
        "*.cn-north-1.amazonaws.com.cn",
        "AWS China service endpoints in cn-north-1: <service>.cn-north-1.amazonaws.com.cn",
    ),
    (
        "*.s3.cn-north-1.amazonaws.com.cn",
        "S3 buckets in China cn-north-1, by virtual-host name",
    ),
    (
        "*.s3.dualstack.cn-north-1.amazonaws.com.cn",
        "S3 buckets in China cn-north-1, by dual-stack virtual-host name",
    ),
    (
        "*.cn-northwest-1.amazonaws.com.cn",
        "AWS China service endpoints in cn-northwest-1: <service>.cn-northwest-1.amazonaws.com.cn",
    ),
    (
        "*.s3.cn-northwest-1.amazonaws.com.cn",
        "S3 buckets in China cn-northwest-1, by virtual-host name",
    ),
    (
        "*.s3.dualstack.cn-northwest-1.amazonaws.com.cn",
        "S3 buckets in China cn-northwest-1, by dual-stack virtual-host name",
    ),
    (
        "*.us-east-1.api.aws",
        "AWS services' dual-stack endpoints in us-east-1: <service>.us-east-1.api.aws",
    ),
    (
        "*.us-east-2.api.aws",
        "AWS services' dual-stack endpoints in us-east-2: <service>.us-east-2.api.aws",
    ),
    (
        "*.us-west-1.api.aws",
        "AWS services' dual-stack endpoints in us-west-1: <service>.us-west-1.api.aws",
    ),
    (
        "*.us-west-2.api.aws",
        "AWS services' dual-stack endpoints in us-west-2: <service>.us-west-2.api.aws",
    ),
    (
        "*.ca-central-1.api.aws",
        "AWS services' dual-stack endpoints in ca-central-1: <service>.ca-central-1.api.aws",
    ),
    (
        "*.eu-west-1.api.aws",
        "AWS services' dual-stack endpoints in eu-west-1: <service>.eu-west-1.api.aws",
    ),
    (
        "*.eu-west-2.api.aws",
        "AWS services' dual-stack endpoints in eu-west-2: <service>.eu-west-2.api.aws",
    ),
    (
        "*.eu-west-3.api.aws",
        "AWS services' dual-stack endpoints in eu-west-3: <service>.eu-west-3.api.aws",
    ),
    (
        "*.eu-central-1.api.aws",
        "AWS services' dual-stack endpoints in eu-central-1: <service>.eu-central-1.api.aws",
    ),
    (
        "*.eu-north-1.api.aws",
        "AWS services' dual-stack endpoints in eu-north-1: <service>.eu-north-1.api.aws",
    ),
    (
        "*.ap-northeast-1.api.aws",
        "AWS services' dual-stack endpoints in ap-northeast-1: <service>.ap-northeast-1.api.aws",
    ),
    (
        "*.ap-southeast-1.api.aws",
        "AWS services' dual-stack endpoints in ap-southeast-1: <service>.ap-southeast-1.api.aws",
    ),
    (
        "*.ap-southeast-2.api.aws",
        "AWS services' dual-stack endpoints in ap-southeast-2: <service>.ap-southeast-2.api.aws",
    ),
    (
        "*.ap-south-1.api.aws",
        "AWS services' dual-stack endpoints in ap-south-1: <service>.ap-south-1.api.aws",
    ),
    (
        "*.sa-east-1.api.aws",
        "AWS services' dual-stack endpoints in sa-east-1: <service>.sa-east-1.api.aws",
    ),
    (
        "*.us-gov-west-1.api.aws",
        "AWS services' dual-stack endpoints in us-gov-west-1: <service>.us-gov-west-1.api.aws",
    ),
    (
        "*.us-gov-east-1.api.aws",
        "AWS services' dual-stack endpoints in us-gov-east-1: <service>.us-gov-east-1.api.aws",
    ),
];

/// Domains whose labels belong to different owners (public suffixes, and hosting where
/// customers name a subdomain and run code on it): a wildcard directly under one of these
/// would be wider than one provider.
const SHARED_SUFFIXES: &[&str] = &[
    "co.uk",
    "com.au",
    "co.jp",
    "com.br",
    "azurewebsites.net",
    "cloudapp.net",
    "herokuapp.com",
    "vercel.app",
    "workers.dev",
    "pages.dev",
    "netlify.app",
    "github.io",
    "appspot.com",
    "cloudfront.net",
    "amazonaws.com",
    "amazonaws.com.cn",
    "supabase.co",
    "web.app",
    "firebaseapp.com",
    "fly.dev",
    "onrender.com",
    "ngrok.io",
    "ngrok-free.app",
    "azure.com",
    "googleapis.com",
    "run.app",
];

/// The catalog's invariants (issue 22): more than a hundred providers; hosts are names, never
/// IP addresses; a wildcard stands for one label, under a reviewed domain of three labels or
/// one label under a reviewed domain that is the provider's own (never `*.com`, `*.co.uk`
/// or a hosting domain); patterns compile (the parser refuses those that do not)
/// and accept the provider's own placeholder, which must still say what it is.
///
/// The placeholder *matches* the key pattern on purpose (the parser enforces it): SDKs that
/// check a key's shape before sending (OpenAI's, Anthropic's, the Vercel AI SDK's) must
/// accept it, and a smuggled real key is told from the placeholder by comparing with the
/// placeholder itself, not by the pattern.
#[test]
fn the_builtin_catalog_keeps_its_invariants() {
    let catalog = Catalog::builtin();
    assert!(
        catalog.providers().len() >= 100,
        "{} built-in providers",
        catalog.providers().len()
    );
    for p in catalog.providers() {
        for pattern in p.host_patterns() {
            let host = pattern.strip_prefix("*.").unwrap_or(pattern);
            assert!(
                host.parse::<std::net::IpAddr>().is_err(),
                "{}: {pattern} is an IP address",
                p.name
            );
            assert!(
                host.split('.').count() >= 2
                    && host.split('.').all(|l| !l.is_empty()
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
                "{}: {pattern} is not a host name",
                p.name
            );
            assert!(
                !host.contains('*'),
                "{}: {pattern}: a wildcard only as the first label",
                p.name
            );
            if pattern.starts_with("*.") {
                assert!(
                    REVIEWED_WILDCARDS.iter().any(|(w, _)| *w == pattern),
                    "{}: wildcard {pattern} is not in REVIEWED_WILDCARDS",
                    p.name
                );
                assert!(
                    !SHARED_SUFFIXES.contains(&host),
                    "{}: {pattern} is wider than one label under the provider's domain",
                    p.name
                );
            }
        }
        assert!(p.key_matches(&p.placeholder), "{}", p.name);
        assert!(
            p.placeholder
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)),
            "{}: placeholder outside the URL-unreserved characters",
            p.name
        );
    }
    for (w, _) in REVIEWED_WILDCARDS {
        assert!(
            catalog.host_patterns().iter().any(|h| h == w),
            "REVIEWED_WILDCARDS lists {w}, which no built-in uses"
        );
    }
}

const AWS_LIKE: &str = r#"name = "cloud"
env = ["CLOUD_KEY_ID"]
placeholder = "AKIABROKERPLACEHOLD2"
key_pattern = '^AKIA[A-Z0-9]{16}$'
auth = "aws_sigv4"

[aws_sigv4]
secret_env = "CLOUD_SECRET"
secret_placeholder = "brokerPlaceholderSecretAccessKey00000002"
session_token_env = "CLOUD_TOKEN"
session_token_placeholder = "broker-placeholder-cloud-session-token"

[[routes]]
hosts = ["*.cloud.example"]
credential = [{ header = "authorization" }]
"#;

#[test]
fn aws_sigv4_providers_have_their_own_placeholders_per_variable() {
    let p = parse(AWS_LIKE).expect("parses");
    assert_eq!(p.auth, AuthKind::AwsSigv4);
    assert_eq!(
        p.env_placeholders(),
        vec![
            (
                "CLOUD_KEY_ID".to_string(),
                "AKIABROKERPLACEHOLD2".to_string()
            ),
            (
                "CLOUD_SECRET".to_string(),
                "brokerPlaceholderSecretAccessKey00000002".to_string()
            ),
        ]
    );
    assert_eq!(
        p.env_if_set_placeholders(),
        vec![(
            "CLOUD_TOKEN".to_string(),
            "broker-placeholder-cloud-session-token".to_string()
        )]
    );
    let vars: Vec<&String> = p.key_vars().collect();
    assert_eq!(vars, ["CLOUD_KEY_ID", "CLOUD_SECRET", "CLOUD_TOKEN"]);

    let without_table = AWS_LIKE.split("[aws_sigv4]").next().expect("head").to_string()
        + "[[routes]]\nhosts = [\"*.cloud.example\"]\ncredential = [{ header = \"authorization\" }]\n";
    assert!(err(&without_table).contains("needs an [aws_sigv4] table"));
    let without_auth = AWS_LIKE.replace("auth = \"aws_sigv4\"\n", "");
    assert!(err(&without_auth).contains("needs auth = \"aws_sigv4\""));
    let same = AWS_LIKE.replace(
        "broker-placeholder-cloud-session-token",
        "brokerPlaceholderSecretAccessKey00000002",
    );
    assert!(err(&same).contains("must differ"));
    let twice = AWS_LIKE.replace(
        "session_token_env = \"CLOUD_TOKEN\"",
        "session_token_env = \"CLOUD_KEY_ID\"",
    );
    assert!(err(&twice).contains("listed twice"));
}

#[test]
fn the_aws_builtin_covers_regional_and_bucket_hosts_one_label_deep() {
    let catalog = Catalog::builtin();
    let aws = catalog.get("aws").expect("aws");
    assert!(crate::proxy::sigv4::credential::looks_like_key_id(
        &aws.placeholder
    ));
    assert!(aws.placeholder.contains("BROKER"));
    let secret = &aws.aws_sigv4.as_ref().expect("sigv4").secret_placeholder;
    assert_eq!(secret.len(), 40);
    assert!(secret.contains("broker") && secret.contains("Placeholder"));
    for host in [
        "sts.amazonaws.com",
        "s3.amazonaws.com",
        "bucket.s3.amazonaws.com",
        "sts.us-west-2.amazonaws.com",
        "sts-fips.us-east-1.amazonaws.com",
        "s3-fips.us-east-2.amazonaws.com",
        "bucket.s3.eu-central-1.amazonaws.com",
        "dynamodb.ap-southeast-2.amazonaws.com",
        // S3 dual-stack, GovCloud, China.
        "s3.dualstack.us-east-1.amazonaws.com",
        "bucket.s3.dualstack.eu-west-1.amazonaws.com",
        "iam.us-gov.amazonaws.com",
        "sts.us-gov-west-1.amazonaws.com",
        "bucket.s3.us-gov-east-1.amazonaws.com",
        "s3.dualstack.us-gov-west-1.amazonaws.com",
        "sts.cn-north-1.amazonaws.com.cn",
        "bucket.s3.cn-northwest-1.amazonaws.com.cn",
        "s3.dualstack.cn-north-1.amazonaws.com.cn",
        // Other services' dual-stack names.
        "ec2.us-east-1.api.aws",
        "lambda.us-gov-west-1.api.aws",
    ] {
        let (p, _) = catalog
            .route_for_host(host)
            .unwrap_or_else(|| panic!("{host}"));
        assert_eq!(p.name, "aws", "{host}");
    }
    for host in [
        "amazonaws.com",
        "a.b.c.amazonaws.com",
        "customer-host.amazonaws.com",
        "amazonaws.com.evil.example",
        "s3.amazonaws.com.cn",
        "customer-host.amazonaws.com.cn",
        "a.b.dualstack.us-east-1.amazonaws.com",
        "bucket.s3.dualstack.amazonaws.com",
        "customer.api.aws",
        "a.b.us-east-1.api.aws",
    ] {
        assert!(catalog.route_for_host(host).is_none(), "{host}");
    }
    for pattern in aws.host_patterns() {
        let rest = pattern.strip_prefix("*.").unwrap_or(pattern);
        assert!(!rest.contains('*'), "{pattern}");
        assert!(
            rest.ends_with(".amazonaws.com")
                || rest.ends_with(".amazonaws.com.cn")
                || rest.ends_with(".api.aws"),
            "{pattern}"
        );
        for apex in ["amazonaws.com", "amazonaws.com.cn", "api.aws"] {
            assert_ne!(rest, apex, "never a wildcard over every AWS host");
        }
    }
}
