//! MCP client configs: where they are, which servers they define, and the edits that move a
//! server's literal keys into the vault.
//!
//! The shapes read (every client writes a map from server name to server):
//! - Claude Desktop `claude_desktop_config.json`, Cursor `mcp.json`, Claude Code `.mcp.json`:
//!   `{"mcpServers": {NAME: SERVER}}`.
//! - Claude Code `~/.claude.json`: the same at the top level (user scope) and in
//!   `projects.<dir>.mcpServers` (local scope).
//! - VS Code `mcp.json`: `{"servers": {NAME: SERVER}, "inputs": [...]}`; a value written
//!   `${input:ID}` is prompted for by VS Code and kept in its secret storage, not in the file.
//!
//! A SERVER is stdio (`command`, `args`, `env`; VS Code also `envFile`) or remote (`url`,
//! `headers`; `type` says `http`/`sse`). Values with `${...}` are the clients' references to
//! other variables or inputs, not literals.
//!
//! A stdio server the import takes a key from is started under `broker run` from then on:
//! `"command": "<this broker>", "args": ["run", "--", <old command>, <old args>...]`, and its
//! env var holds the placeholder (which `broker run` would give it anyway). The absolute
//! path, because GUI clients (Claude Desktop) do not start servers with the shell's `PATH`.
//! A remote server's header gets the placeholder only when its host is one the provider sends
//! its key to; the MCP client sends that header itself, so the client must then run under
//! `broker run` (said in the plan and the README).

use std::path::{Path, PathBuf};

use super::json::{self, Edit, Node};
use super::{classify_for, secret_like_name, Finding, FoundKey, Outcome, Recognizer};
use crate::providers::{Injection, Scheme};

/// A config file and the client that reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub client: &'static str,
}

/// The configs in the standard places that exist: the user's (under `home_dir`) and the
/// project's (under `project`).
pub fn standard_locations(home_dir: Option<&Path>, project: &Path) -> Vec<Location> {
    let mut out = Vec::new();
    if let Some(home) = home_dir {
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| home.join(".config"));
        out.extend([
            Location {
                path: config.join("Claude/claude_desktop_config.json"),
                client: "Claude Desktop",
            },
            Location {
                path: home.join(".claude.json"),
                client: "Claude Code (user and local scopes)",
            },
            Location {
                path: home.join(".cursor/mcp.json"),
                client: "Cursor (global)",
            },
            Location {
                path: config.join("Code/User/mcp.json"),
                client: "VS Code (user)",
            },
        ]);
    }
    out.extend(project_locations(project));
    out.retain(|l| l.path.is_file());
    out.dedup_by(|a, b| a.path == b.path);
    out
}

/// The project-level configs of the directory `dir` (existing or not).
pub fn project_locations(dir: &Path) -> Vec<Location> {
    vec![
        Location {
            path: dir.join(".mcp.json"),
            client: "Claude Code (project)",
        },
        Location {
            path: dir.join(".cursor/mcp.json"),
            client: "Cursor (project)",
        },
        Location {
            path: dir.join(".vscode/mcp.json"),
            client: "VS Code (workspace)",
        },
    ]
}

/// How a rewrapped server starts `broker run`.
#[derive(Debug, Clone)]
pub struct Wrap {
    /// The broker binary, absolute.
    pub broker: String,
    /// `--profile` for `broker run`, when not the default.
    pub profile: Option<String>,
}

/// What importing one config finds and changes.
#[derive(Debug, Default)]
pub struct ConfigImport {
    pub findings: Vec<Finding>,
    pub keys: Vec<FoundKey>,
    /// The new text, when anything changes.
    pub new_text: Option<String>,
    /// Servers now started under `broker run`.
    pub wrapped: Vec<String>,
    /// Remote servers whose header now holds a placeholder: the client must run under
    /// `broker run` for them.
    pub remote: Vec<String>,
}

/// Import from the config `text`.
pub fn import_config(
    text: &str,
    recognizer: &Recognizer<'_>,
    wrap: &Wrap,
) -> Result<ConfigImport, json::ParseError> {
    let root = json::parse(text)?;
    let mut out = ConfigImport::default();
    let mut edits = Vec::new();
    for (label, server) in servers(&root) {
        import_server(text, &label, server, recognizer, wrap, &mut out, &mut edits);
    }
    if !edits.is_empty() {
        out.new_text = Some(json::apply(text, &edits));
    }
    Ok(out)
}

/// Every server definition of the config, with a label saying where it is.
fn servers(root: &Node) -> Vec<(String, &Node)> {
    let mut out = Vec::new();
    for key in ["mcpServers", "servers"] {
        for m in root.get(key).map_or(&[][..], Node::members) {
            out.push((format!("{key}.{}", m.key), &m.value));
        }
    }
    for project in root.get("projects").map_or(&[][..], Node::members) {
        for m in project
            .value
            .get("mcpServers")
            .map_or(&[][..], Node::members)
        {
            out.push((
                format!("projects[{}].mcpServers.{}", project.key, m.key),
                &m.value,
            ));
        }
    }
    out
}

fn import_server(
    text: &str,
    label: &str,
    server: &Node,
    recognizer: &Recognizer<'_>,
    wrap: &Wrap,
    out: &mut ConfigImport,
    edits: &mut Vec<Edit>,
) {
    let mut moved = false;
    for m in server.get("env").map_or(&[][..], Node::members) {
        let Some(value) = m.value.as_str() else {
            continue;
        };
        let recognition = recognizer.classify(&m.key, value, !value.contains("${"));
        if let Some(p) = Finding::from_recognition(
            format!("{label}.env"),
            &m.key,
            value,
            recognition,
            recognizer,
            &mut out.keys,
            &mut out.findings,
        ) {
            edits.push(Edit {
                range: m.value.span(),
                text: json::quote(&p.placeholder),
            });
            moved = true;
        }
    }
    moved |= import_args(label, server, recognizer, out, edits);
    import_headers(label, server, recognizer, out, edits);
    if let Some(env_file) = server.get("envFile").and_then(Node::as_str) {
        out.findings.push(Finding {
            location: format!("{label}.envFile"),
            name: "envFile".into(),
            provider: None,
            masked: String::new(),
            outcome: Outcome::Note(format!(
                "the server also reads {env_file}: import it with `broker import .env {env_file}`"
            )),
            formats: Vec::new(),
        });
    }
    if moved && server.get("command").is_some() && !is_wrapped(server) {
        if let Some(wrap_edits) = wrap_command(text, server, wrap) {
            edits.extend(wrap_edits);
            out.wrapped.push(label.to_string());
        }
    }
}

/// Keys in arguments: `--openai-api-key=KEY`, `OPENAI_API_KEY=KEY` (docker's `-e`), or
/// `--openai-api-key KEY`. The name decides the provider, as for env vars; a bare value is
/// never guessed.
fn import_args(
    label: &str,
    server: &Node,
    recognizer: &Recognizer<'_>,
    out: &mut ConfigImport,
    edits: &mut Vec<Edit>,
) -> bool {
    let items = server.get("args").map_or(&[][..], Node::items);
    let mut moved = false;
    let mut i = 0;
    while i < items.len() {
        let Some(arg) = items[i].as_str() else {
            i += 1;
            continue;
        };
        let location = format!("{label}.args[{i}]");
        if let Some((flag, value)) = arg.split_once('=').filter(|(f, _)| !f.is_empty()) {
            let name = arg_name(flag);
            let recognition = recognizer.classify(&name, value, !value.contains("${"));
            if let Some(p) = Finding::from_recognition(
                location,
                &name,
                value,
                recognition,
                recognizer,
                &mut out.keys,
                &mut out.findings,
            ) {
                edits.push(Edit {
                    range: items[i].span(),
                    text: json::quote(&format!("{flag}={}", p.placeholder)),
                });
                moved = true;
            }
        } else if arg.starts_with('-') {
            if let Some(value) = items
                .get(i + 1)
                .and_then(Node::as_str)
                .filter(|v| !v.starts_with('-'))
            {
                let name = arg_name(arg);
                let recognition = recognizer.classify(&name, value, !value.contains("${"));
                let location = format!("{label}.args[{}]", i + 1);
                if let Some(p) = Finding::from_recognition(
                    location,
                    &name,
                    value,
                    recognition,
                    recognizer,
                    &mut out.keys,
                    &mut out.findings,
                ) {
                    edits.push(Edit {
                        range: items[i + 1].span(),
                        text: json::quote(&p.placeholder),
                    });
                    moved = true;
                    i += 1;
                }
            }
        }
        i += 1;
    }
    moved
}

/// `--openai-api-key` -> `OPENAI_API_KEY`.
fn arg_name(flag: &str) -> String {
    flag.trim_start_matches('-')
        .replace('-', "_")
        .to_ascii_uppercase()
}

/// A remote server's headers. The key goes where the provider's route says it goes on
/// requests to that host (`Authorization: Bearer`, `x-api-key`, ...); a header for a host
/// no provider manages is listed and left alone.
fn import_headers(
    label: &str,
    server: &Node,
    recognizer: &Recognizer<'_>,
    out: &mut ConfigImport,
    edits: &mut Vec<Edit>,
) {
    let headers = server.get("headers").map_or(&[][..], Node::members);
    if headers.is_empty() {
        return;
    }
    let host = server.get("url").and_then(Node::as_str).and_then(url_host);
    let route = host
        .as_deref()
        .and_then(|h| recognizer.catalog().route_for_host(h));
    let mut changed = false;
    for m in headers {
        let Some(value) = m.value.as_str() else {
            continue;
        };
        let literal = !value.contains("${");
        let location = format!("{label}.headers");
        let carried = route.and_then(|(provider, route)| {
            route.credential.iter().find_map(|inj| match inj {
                Injection::Header { name, scheme } if name.eq_ignore_ascii_case(&m.key) => {
                    split_scheme(value, scheme.as_ref())
                        .map(|(prefix, key)| (provider, prefix, key))
                }
                _ => None,
            })
        });
        match carried {
            Some((provider, prefix, key)) => {
                let recognition = classify_for(provider, key, literal);
                if let Some(p) = Finding::from_recognition(
                    location,
                    &m.key,
                    key,
                    recognition,
                    recognizer,
                    &mut out.keys,
                    &mut out.findings,
                ) {
                    edits.push(Edit {
                        range: m.value.span(),
                        text: json::quote(&format!("{prefix}{}", p.placeholder)),
                    });
                    changed = true;
                }
            }
            None if literal && !value.is_empty() && secret_like_name(&m.key) => {
                let secret = split_scheme(value, Some(&Scheme::Bearer)).map_or(value, |(_, k)| k);
                let outcome = match (&host, route) {
                    (Some(h), None) => Outcome::UnmanagedHost(h.clone()),
                    _ => Outcome::Unrecognised,
                };
                out.findings.push(Finding {
                    location,
                    name: m.key.clone(),
                    provider: route.map(|(p, _)| p.name.clone()),
                    masked: super::masked(secret),
                    outcome,
                    formats: recognizer.formats(secret),
                });
            }
            None => {}
        }
    }
    if changed {
        out.remote.push(label.to_string());
    }
}

/// The key in a header value written with `scheme`, and what comes before it.
fn split_scheme<'v>(value: &'v str, scheme: Option<&Scheme>) -> Option<(&'v str, &'v str)> {
    let word = match scheme {
        None => return Some(("", value)),
        Some(Scheme::Bearer) => "bearer",
        Some(Scheme::Token) => "token",
        // A Basic credential holds the key base64-encoded with a user name: not rewritten.
        Some(Scheme::Basic { .. }) => return None,
    };
    let head = value.get(..word.len())?;
    let rest = &value[word.len()..];
    if !head.eq_ignore_ascii_case(word) || !rest.starts_with(' ') {
        return None;
    }
    let key = rest.trim_start_matches(' ');
    Some((&value[..value.len() - key.len()], key))
}

/// The host of an `http(s)://` URL, lowercase, without port or brackets.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Already started under `broker run` (by an earlier import or by hand)?
fn is_wrapped(server: &Node) -> bool {
    let command = server.get("command").and_then(Node::as_str).unwrap_or("");
    let first = server
        .get("args")
        .and_then(|a| a.items().first())
        .and_then(Node::as_str);
    Path::new(command)
        .file_name()
        .is_some_and(|n| n == "broker")
        && first == Some("run")
}

/// The edits that make `command ARGS...` into `broker run [--profile P] -- command ARGS...`,
/// in the file's own layout: new arguments are separated as the existing ones are.
fn wrap_command(text: &str, server: &Node, wrap: &Wrap) -> Option<Vec<Edit>> {
    let command_member = server.member("command")?;
    let command = command_member.value.as_str()?;
    let mut prefix: Vec<String> = vec!["run".into()];
    if let Some(profile) = &wrap.profile {
        prefix.extend(["--profile".into(), profile.clone()]);
    }
    prefix.extend(["--".into(), command.to_string()]);
    let quoted: Vec<String> = prefix.iter().map(|s| json::quote(s)).collect();
    let mut edits = vec![Edit {
        range: command_member.value.span(),
        text: json::quote(&wrap.broker),
    }];
    match server.get("args") {
        Some(args @ Node::Array { items, .. }) if !items.is_empty() => {
            let first = items[0].span();
            let sep = match items.get(1) {
                Some(second) => text[items[0].span().end..second.span().start].to_string(),
                None => {
                    let lead = &text[args.span().start + 1..first.start];
                    if lead.contains('\n') {
                        format!(",{lead}")
                    } else {
                        ", ".to_string()
                    }
                }
            };
            edits.push(Edit {
                range: first.start..first.start,
                text: format!("{}{sep}", quoted.join(&sep)),
            });
        }
        Some(args @ Node::Array { .. }) => edits.push(Edit {
            range: args.span(),
            text: format!("[{}]", quoted.join(", ")),
        }),
        Some(_) => return None,
        None => {
            let key_start = command_member.key_span.start;
            let indent_start = text[..key_start]
                .rfind(|c: char| !c.is_ascii_whitespace())
                .map_or(0, |i| i + 1);
            // The command member's own indentation; one space in a one-line object.
            let indent = match &text[indent_start..key_start] {
                "" => " ",
                ws => ws,
            };
            let colon = &text[command_member.key_span.end..command_member.value.span().start];
            let at = command_member.value.span().end;
            edits.push(Edit {
                range: at..at,
                text: format!(",{indent}\"args\"{colon}[{}]", quoted.join(", ")),
            });
        }
    }
    Some(edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Catalog;

    fn key() -> String {
        format!("sk-{}", "mcp0unit0test0key0long0enough0x")
    }

    fn wrap() -> Wrap {
        Wrap {
            broker: "/usr/bin/broker".into(),
            profile: None,
        }
    }

    fn import(text: &str) -> ConfigImport {
        let catalog = Catalog::builtin();
        let r = Recognizer::new(&catalog, &[]).expect("recognizer");
        import_config(text, &r, &wrap()).expect("import")
    }

    #[test]
    fn a_stdio_server_is_wrapped_in_its_own_layout() {
        let text = format!(
            "{{\n  \"mcpServers\": {{\n    \"s\": {{\n      \"command\": \"npx\",\n      \"args\": [\n        \"-y\",\n        \"pkg\"\n      ],\n      \"env\": {{ \"OPENAI_API_KEY\": \"{}\", \"LOG\": \"1\" }}\n    }}\n  }}\n}}\n",
            key()
        );
        let out = import(&text);
        let new = out.new_text.expect("changed");
        assert!(!new.contains(&key()));
        assert!(new.contains(
            "\"command\": \"/usr/bin/broker\",\n      \"args\": [\n        \"run\",\n        \"--\",\n        \"npx\",\n        \"-y\",\n        \"pkg\"\n      ],"
        ), "{new}");
        assert!(new.contains("\"LOG\": \"1\" }"));
        assert_eq!(out.keys.len(), 1);
        assert_eq!(out.wrapped, ["mcpServers.s"]);
        // Idempotent: a second import finds the placeholder and the wrapper.
        let again = import(&new);
        assert!(again.new_text.is_none());
        assert!(again.keys.is_empty());
    }

    #[test]
    fn args_are_added_when_missing_and_keys_in_args_move() {
        let text = format!(
            "{{\"mcpServers\": {{\"a\": {{\"command\": \"srv\", \"env\": {{\"X\": \"{k}\"}}}}, \"b\": {{\"command\": \"srv\", \"args\": [\"--openai-api-key\", \"{k}\", \"OPENAI_API_KEY={k}\"]}}, \"c\": {{\"command\": \"srv\", \"args\": []}}}}}}",
            k = key()
        );
        let out = import(&text);
        let new = out.new_text.expect("changed");
        // Server a has no recognised key (X is not a provider's variable): untouched.
        assert_eq!(new.matches(&key()).count(), 1, "{new}");
        assert!(new.contains("\"a\": {\"command\": \"srv\", \"env\""));
        assert!(new.contains("\"b\": {\"command\": \"/usr/bin/broker\", \"args\": [\"run\", \"--\", \"srv\", \"--openai-api-key\", \"sk-broker-placeholder-openai"));
        assert!(new.contains("\"c\": {\"command\": \"srv\", \"args\": []}"));
        let missing = format!(
            "{{\"mcpServers\": {{\"a\": {{\"command\": \"srv\", \"env\": {{\"OPENAI_API_KEY\": \"{}\"}}}}}}}}",
            key()
        );
        let new = import(&missing).new_text.expect("changed");
        assert!(
            new.contains(
                "\"command\": \"/usr/bin/broker\", \"args\": [\"run\", \"--\", \"srv\"], \"env\""
            ),
            "{new}"
        );
    }

    #[test]
    fn headers_only_for_hosts_the_provider_owns() {
        let text = format!(
            "{{\"servers\": {{\"r\": {{\"type\": \"http\", \"url\": \"https://api.openai.com/mcp\", \"headers\": {{\"Authorization\": \"Bearer {k}\"}}}}, \"o\": {{\"url\": \"https://mcp.example.com/\", \"headers\": {{\"Authorization\": \"Bearer {k}\"}}}}}}}}",
            k = key()
        );
        let out = import(&text);
        let new = out.new_text.expect("changed");
        assert!(new.contains("\"Authorization\": \"Bearer sk-broker-placeholder-openai"));
        assert_eq!(
            new.matches(&key()).count(),
            1,
            "the unmanaged host keeps its header"
        );
        assert_eq!(out.remote, ["servers.r"]);
        assert!(out
            .findings
            .iter()
            .any(|f| f.outcome == Outcome::UnmanagedHost("mcp.example.com".into())));
    }

    #[test]
    fn claude_code_projects_and_references() {
        let text = format!(
            "{{\"projects\": {{\"/p\": {{\"mcpServers\": {{\"s\": {{\"command\": \"x\", \"env\": {{\"GITHUB_TOKEN\": \"${{GH}}\", \"OPENAI_API_KEY\": \"{}\"}}}}}}}}}}}}",
            key()
        );
        let out = import(&text);
        assert_eq!(out.wrapped, ["projects[/p].mcpServers.s"]);
        assert!(out
            .findings
            .iter()
            .any(|f| f.name == "GITHUB_TOKEN" && f.outcome == Outcome::NotLiteral));
    }

    #[test]
    fn schemes_and_hosts() {
        assert_eq!(
            split_scheme("Bearer abc", Some(&Scheme::Bearer)),
            Some(("Bearer ", "abc"))
        );
        assert_eq!(
            split_scheme("bearer  abc", Some(&Scheme::Bearer)),
            Some(("bearer  ", "abc"))
        );
        assert_eq!(split_scheme("Basic abc", Some(&Scheme::Bearer)), None);
        assert_eq!(split_scheme("abc", None), Some(("", "abc")));
        assert_eq!(
            url_host("https://u:p@API.x.com:8443/a?b").as_deref(),
            Some("api.x.com")
        );
        assert_eq!(url_host("http://[::1]:3000/").as_deref(), Some("::1"));
        assert_eq!(url_host("nope"), None);
    }
}
