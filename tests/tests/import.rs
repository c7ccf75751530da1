//! `broker import`: `.env` files, the shell's environment and MCP client configs, through the
//! real binary in a temporary HOME. The keys are made up at run time (no key-like literal in
//! the repository), and every output and file is checked for them.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use broker_integration::{contains, run_bounded, scrub, Home, Origin, TestCa};

/// A made-up key: `prefix` then a tag and enough characters for the provider's pattern.
fn key(prefix: &str, tag: &str) -> String {
    format!("{prefix}{tag}{}", "-import-test-0123456789abcdef")
}

struct Keys {
    openai: String,
    anthropic: String,
    github: String,
    groq: String,
    acme: String,
    /// For a host no provider manages: must be left alone.
    foreign: String,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            openai: key("sk-", "openai"),
            anthropic: key("sk-ant-", "anthropic"),
            github: format!("ghp_{}", "importtest".repeat(4)),
            groq: format!("gsk_{}", "importtest".repeat(3)),
            acme: key("acme-", "mcp"),
            foreign: key("zz-", "foreign"),
        }
    }

    fn imported(&self) -> [&str; 5] {
        [
            &self.openai,
            &self.anthropic,
            &self.github,
            &self.groq,
            &self.acme,
        ]
    }
}

/// A temporary user: HOME, a project directory, and the broker home.
struct User {
    home: Home,
    dir: tempfile::TempDir,
}

impl User {
    fn new() -> User {
        let user = User {
            home: Home::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::create_dir_all(user.project()).expect("project");
        user
    }

    fn home_dir(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn project(&self) -> PathBuf {
        self.dir.path().join("home/project")
    }

    /// `broker import ARGS` as this user, in the project directory.
    fn import(&self, args: &[&str]) -> Output {
        let mut cmd = self.home.broker();
        cmd.arg("import")
            .args(args)
            .env("HOME", self.home_dir())
            .env_remove("XDG_CONFIG_HOME")
            .current_dir(self.project())
            .stdin(Stdio::null());
        run_bounded(&mut cmd, Duration::from_secs(30))
    }

    fn import_ok(&self, args: &[&str]) -> Output {
        let out = self.import(args);
        assert!(
            out.status.success(),
            "broker import {args:?} failed:\n{}",
            text(&out)
        );
        out
    }

    fn write(&self, rel: &str, contents: &str, mode: u32) -> PathBuf {
        let path = self.home_dir().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, contents).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    /// Providers stored in the vault (`broker list --json`).
    fn stored(&self) -> Vec<(String, String)> {
        let out = self.home.broker_ok(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        list.as_array()
            .expect("array")
            .iter()
            .map(|c| {
                (
                    c["provider"].as_str().expect("provider").to_string(),
                    c["profile"].as_str().expect("profile").to_string(),
                )
            })
            .collect()
    }
}

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_keys_in(out: &Output, keys: &[&str]) {
    for k in keys {
        assert!(
            !contains(&out.stdout, k) && !contains(&out.stderr, k),
            "a key was printed:\n{}",
            text(out)
        );
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// The backups of the broker home: the directory is 0700, each file 0600.
fn backups(home: &Home) -> Vec<PathBuf> {
    let dir = home.path().join("import/backups");
    assert_eq!(mode(&dir), 0o700, "backup directory mode");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("backups")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for f in &files {
        assert_eq!(mode(f), 0o600, "{} mode", f.display());
    }
    files
}

fn placeholder(home: &Home, provider: &str) -> String {
    home.placeholder(provider)
}

fn dotenv_text(k: &Keys, gemini_placeholder: &str) -> String {
    format!(
        "# API keys for the app\r\n\
         export OPENAI_API_KEY=\"{}\"\r\n\
         ANTHROPIC_API_KEY = {}   # the team key\n\
         \n\
         GITHUB_TOKEN=not-a-token\n\
         GEMINI_API_KEY='{gemini_placeholder}'\n\
         MY_SERVICE_TOKEN=opaque-value-123\n\
         DEBUG=1\n\
         GROQ_API_KEY='{}'",
        k.openai, k.anthropic, k.groq
    )
}

#[test]
fn dotenv_import_is_a_dry_run_then_rewrites_in_place_and_undoes() {
    let user = User::new();
    let k = Keys::new();
    let gemini = placeholder(&user.home, "gemini");
    let original = dotenv_text(&k, &gemini);
    let env = user.write("project/.env", &original, 0o640);

    // Dry run: the plan, no secret in it, nothing changed or stored.
    let out = user.import_ok(&[".env"]);
    let plan = String::from_utf8_lossy(&out.stdout).to_string();
    assert_no_keys_in(&out, &k.imported());
    for expected in [
        "line 2",
        "OPENAI_API_KEY",
        "openai",
        "ANTHROPIC_API_KEY",
        "GROQ_API_KEY",
        "does not look like a github key",
        "already the placeholder",
        "MY_SERVICE_TOKEN",
        "--map MY_SERVICE_TOKEN=PROVIDER",
        "dry run: nothing was changed",
    ] {
        assert!(plan.contains(expected), "plan lacks {expected:?}:\n{plan}");
    }
    assert!(!plan.contains("DEBUG"), "not a secret, not listed:\n{plan}");
    assert_eq!(std::fs::read_to_string(&env).expect("read"), original);
    assert!(user.stored().is_empty());

    // Apply: only the three values change; every other byte stays.
    let out = user.import_ok(&[".env", "--apply"]);
    assert_no_keys_in(&out, &k.imported());
    let expected = original
        .replace(&k.openai, &placeholder(&user.home, "openai"))
        .replace(&k.anthropic, &placeholder(&user.home, "anthropic"))
        .replace(&k.groq, &placeholder(&user.home, "groq"));
    let rewritten = std::fs::read_to_string(&env).expect("read");
    assert_eq!(rewritten, expected);
    assert_eq!(mode(&env), 0o640, "the file keeps its mode");
    let mut stored = user.stored();
    stored.sort();
    assert_eq!(
        stored,
        [
            ("anthropic", "default"),
            ("groq", "default"),
            ("openai", "default")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let files = backups(&user.home);
    assert_eq!(files.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&files[0]).expect("backup"),
        original
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&files[0].display().to_string()),
        "says where the backup is:\n{stdout}"
    );

    // An agent under `broker run` cannot read the backup: $BROKER_HOME is hidden from it.
    let mut agent = user.home.broker();
    agent
        .args(["run", "--", "cat"])
        .arg(&files[0])
        .current_dir(user.project())
        .stdin(Stdio::null());
    let out = run_bounded(&mut agent, Duration::from_secs(60));
    assert!(
        !out.status.success(),
        "the agent read the backup:\n{}",
        text(&out)
    );
    assert_no_keys_in(&out, &k.imported());

    // Again: nothing to do, no new backup, the file as it was.
    let out = user.import_ok(&[".env", "--apply"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to import"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&env).expect("read"), expected);
    assert_eq!(backups(&user.home).len(), 1);

    // Undo: byte for byte.
    let out = user.import_ok(&[".env", "--undo"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored"));
    assert_eq!(std::fs::read(&env).expect("read"), original.as_bytes());
    assert_eq!(mode(&env), 0o640);
}

#[test]
fn a_different_stored_key_is_not_overwritten_without_replace() {
    let user = User::new();
    let k = Keys::new();
    user.home.add("openai", &key("sk-", "already-stored"));
    let original = format!("OPENAI_API_KEY={}\n", k.openai);
    let env = user.write("project/.env", &original, 0o600);

    let out = user.import_ok(&[".env"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--apply would refuse"),
        "{}",
        text(&out)
    );
    let out = user.import(&[".env", "--apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--replace") && err.contains("--profile"),
        "{err}"
    );
    assert_no_keys_in(&out, &[&k.openai]);
    assert_eq!(std::fs::read_to_string(&env).expect("read"), original);

    // Another profile keeps both; --replace overwrites.
    user.import_ok(&[".env", "--apply", "--profile", "work"]);
    assert!(user.stored().contains(&("openai".into(), "work".into())));
    user.import_ok(&[".env", "--undo"]);
    user.import_ok(&[".env", "--apply", "--replace"]);
    assert!(!std::fs::read_to_string(&env)
        .expect("read")
        .contains(&k.openai));
}

#[test]
fn from_env_stores_and_prints_the_exports_and_names_the_rc_file() {
    let user = User::new();
    let k = Keys::new();
    user.write(
        ".bashrc",
        &format!("alias ll='ls -l'\nexport OPENAI_API_KEY={}\n", k.openai),
        0o644,
    );
    let mut cmd = user.home.broker();
    cmd.args(["import", ".env", "--from-env", "--apply"])
        .env("HOME", user.home_dir())
        .env("OPENAI_API_KEY", &k.openai)
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out));
    assert_no_keys_in(&out, &[&k.openai]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "export OPENAI_API_KEY={}\n",
            placeholder(&user.home, "openai")
        )
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".bashrc:2 sets OPENAI_API_KEY"), "{err}");
    assert_eq!(
        user.stored(),
        [("openai".to_string(), "default".to_string())]
    );
}

/// The configs of four clients, in their own styles: Claude Desktop (2-space), Claude Code's
/// `~/.claude.json` (other state around the servers, a project scope), Cursor (tabs, a remote
/// server for an unmanaged host, a key in args), VS Code (JSONC: comments, inputs).
fn write_mcp_configs(user: &User, k: &Keys) -> Vec<(PathBuf, String)> {
    let desktop = format!(
        r#"{{
  "mcpServers": {{
    "github": {{
      "command": "npx",
      "args": [
        "-y",
        "@modelcontextprotocol/server-github"
      ],
      "env": {{
        "GITHUB_TOKEN": "{}"
      }}
    }},
    "filesystem": {{
      "command": "npx",
      "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"]
    }}
  }}
}}
"#,
        k.github
    );
    let claude = format!(
        r#"{{
  "numStartups": 12,
  "tipsHistory": {{"new-user-warmup": 1}},
  "mcpServers": {{
    "openai-tools": {{
      "type": "stdio",
      "command": "uvx",
      "args": ["openai-mcp"],
      "env": {{
        "OPENAI_API_KEY": "{}",
        "LOG_LEVEL": "debug"
      }}
    }}
  }},
  "projects": {{
    "/work/app": {{
      "allowedTools": [],
      "mcpServers": {{
        "claude-helper": {{
          "command": "node",
          "args": ["helper.js"],
          "env": {{"ANTHROPIC_API_KEY": "{}", "GITHUB_TOKEN": "${{GITHUB_TOKEN}}"}}
        }}
      }}
    }}
  }},
  "userID": "0f0e"
}}"#,
        k.openai, k.anthropic
    );
    let cursor = format!(
        "{{\n\t\"mcpServers\": {{\n\t\t\"groq\": {{\n\t\t\t\"command\": \"groq-mcp\",\n\t\t\t\"args\": [\"--groq-api-key\", \"{}\"]\n\t\t}},\n\t\t\"remote\": {{\n\t\t\t\"url\": \"https://mcp.example.com/sse\",\n\t\t\t\"headers\": {{\"Authorization\": \"Bearer {}\"}}\n\t\t}}\n\t}}\n}}\n",
        k.groq, k.foreign
    );
    let vscode = format!(
        r#"{{
    // Servers for this workspace
    "inputs": [
        {{"type": "promptString", "id": "gh", "description": "GitHub token", "password": true}}
    ],
    "servers": {{
        "acme": {{
            "type": "http",
            "url": "https://mcp.acme.example/mcp",
            "headers": {{"Authorization": "Bearer {}"}},
        }},
        "gh": {{"type": "stdio", "command": "gh-mcp", "env": {{"GITHUB_TOKEN": "${{input:gh}}"}}}}
    }}
}}
"#,
        k.acme
    );
    vec![
        (
            user.write(".config/Claude/claude_desktop_config.json", &desktop, 0o600),
            desktop,
        ),
        (user.write(".claude.json", &claude, 0o600), claude),
        (user.write(".cursor/mcp.json", &cursor, 0o644), cursor),
        (
            user.write("project/.vscode/mcp.json", &vscode, 0o644),
            vscode,
        ),
    ]
}

/// A custom provider whose host is an MCP server's, so a header for it can be imported.
fn acme_provider(home: &Home) {
    let dir = home.path().join("providers");
    std::fs::create_dir_all(&dir).expect("providers dir");
    std::fs::write(
        dir.join("acme.toml"),
        r#"name = "acme"
display_name = "ACME MCP"
env = ["ACME_API_KEY"]
placeholder = "acme-broker-placeholder-0000"
key_pattern = '^acme-[A-Za-z0-9-]{8,}$'
auth = "api_key"
[[routes]]
hosts = ["mcp.acme.example"]
credential = [{ header = "authorization", scheme = "bearer" }]
"#,
    )
    .expect("acme.toml");
}

#[test]
fn mcp_configs_of_four_clients_are_imported_idempotently_and_undone() {
    let user = User::new();
    let k = Keys::new();
    acme_provider(&user.home);
    let configs = write_mcp_configs(&user, &k);

    let out = user.import_ok(&["mcp"]);
    assert_no_keys_in(&out, &k.imported());
    assert_no_keys_in(&out, &[&k.foreign]);
    let plan = String::from_utf8_lossy(&out.stdout).to_string();
    for (path, _) in &configs {
        assert!(
            plan.contains(&path.display().to_string()),
            "plan lacks {}:\n{plan}",
            path.display()
        );
    }
    for expected in [
        "mcpServers.github.env",
        "projects[/work/app].mcpServers.claude-helper.env",
        "mcpServers.groq.args[1]",
        "mcp.example.com is not a host any provider sends its key to",
        "servers.gh.env",
        "the MCP client sends this header itself",
        "dry run: nothing was changed",
    ] {
        assert!(plan.contains(expected), "plan lacks {expected:?}:\n{plan}");
    }
    for (path, original) in &configs {
        assert_eq!(
            &std::fs::read_to_string(path).expect("read"),
            original,
            "dry run changed {}",
            path.display()
        );
    }

    let out = user.import_ok(&["mcp", "--apply"]);
    assert_no_keys_in(&out, &k.imported());
    let broker = std::fs::canonicalize(broker_integration::broker_bin()).expect("broker path");
    let broker = broker.to_str().expect("utf-8 path");
    for (path, original) in &configs {
        let now = std::fs::read_to_string(path).expect("read");
        for key in k.imported() {
            assert!(
                !now.contains(key),
                "{} still holds a key:\n{now}",
                path.display()
            );
        }
        serde_json::from_str::<serde_json::Value>(&strip_jsonc(&now))
            .unwrap_or_else(|e| panic!("{} is no longer JSON ({e}):\n{now}", path.display()));
        assert_eq!(
            mode(path),
            std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .expect("mode")
        );
        let _ = original;
    }
    // Claude Desktop: wrapped in the file's own layout; the other server untouched.
    let desktop = std::fs::read_to_string(&configs[0].0).expect("read");
    assert!(desktop.contains(&format!(
        "\"command\": \"{broker}\",\n      \"args\": [\n        \"run\",\n        \"--\",\n        \"npx\",\n        \"-y\",\n        \"@modelcontextprotocol/server-github\"\n      ],"
    )), "{desktop}");
    assert!(desktop
        .contains("\"args\": [\"-y\", \"@modelcontextprotocol/server-filesystem\", \"/tmp\"]"));
    // Claude Code: everything but the two servers is byte for byte the same.
    let claude = std::fs::read_to_string(&configs[1].0).expect("read");
    assert!(claude
        .starts_with("{\n  \"numStartups\": 12,\n  \"tipsHistory\": {\"new-user-warmup\": 1},"));
    assert!(claude.ends_with("  \"userID\": \"0f0e\"\n}"));
    assert!(
        claude.contains("\"GITHUB_TOKEN\": \"${GITHUB_TOKEN}\""),
        "a reference is kept"
    );
    // Cursor: the unmanaged host's header is left as it was.
    let cursor = std::fs::read_to_string(&configs[2].0).expect("read");
    assert!(cursor.contains(&format!("\"Authorization\": \"Bearer {}\"", k.foreign)));
    assert!(
        cursor.contains(&format!(
            "\"args\": [\"run\", \"--\", \"groq-mcp\", \"--groq-api-key\", \"{}\"]",
            placeholder(&user.home, "groq")
        )),
        "{cursor}"
    );
    assert_eq!(mode(&configs[2].0), 0o644);
    // VS Code: comments and the trailing comma stay; the header holds the placeholder.
    let vscode = std::fs::read_to_string(&configs[3].0).expect("read");
    assert!(vscode.contains("// Servers for this workspace"));
    assert!(vscode
        .contains("\"headers\": {\"Authorization\": \"Bearer acme-broker-placeholder-0000\"},\n"));
    assert!(vscode.contains("\"env\": {\"GITHUB_TOKEN\": \"${input:gh}\"}"));

    let mut stored: Vec<String> = user.stored().into_iter().map(|(p, _)| p).collect();
    stored.sort();
    assert_eq!(stored, ["acme", "anthropic", "github", "groq", "openai"]);
    let files = backups(&user.home);
    assert_eq!(files.len(), configs.len());

    // Again: nothing changes.
    let after: Vec<Vec<u8>> = configs
        .iter()
        .map(|(p, _)| std::fs::read(p).expect("read"))
        .collect();
    let out = user.import_ok(&["mcp", "--apply"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to import"),
        "{}",
        text(&out)
    );
    for ((path, _), bytes) in configs.iter().zip(&after) {
        assert_eq!(
            &std::fs::read(path).expect("read"),
            bytes,
            "{} changed on the second run",
            path.display()
        );
    }
    assert_eq!(backups(&user.home).len(), configs.len());

    // A file changed since the import is not undone without --force; nothing else is either.
    let cursor_path = &configs[2].0;
    let edited = format!("{cursor}\n");
    std::fs::write(cursor_path, &edited).expect("edit");
    let out = user.import(&["mcp", "--undo"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed since the import"));
    assert_eq!(
        std::fs::read(&configs[0].0).expect("read"),
        after[0],
        "a refused undo restores nothing"
    );
    let out = user.import_ok(&["mcp", "--undo", "--force"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored"));
    for (path, original) in &configs {
        assert_eq!(
            std::fs::read(path).expect("read"),
            original.as_bytes(),
            "{} not restored byte for byte",
            path.display()
        );
    }
}

/// Comments and trailing commas out, for checking a rewritten JSONC file with serde_json.
fn strip_jsonc(text: &str) -> String {
    let no_comments: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    no_comments.replace(",\n        }", "\n        }")
}

#[test]
fn a_malformed_config_is_reported_and_nothing_is_changed() {
    let user = User::new();
    let k = Keys::new();
    let good = format!("{{\"mcpServers\": {{\"s\": {{\"command\": \"x\", \"env\": {{\"OPENAI_API_KEY\": \"{}\"}}}}}}}}", k.openai);
    let bad = format!(
        "{{\n  \"mcpServers\": {{\n    \"s\": {{\"env\": {{\"GROQ_API_KEY\": \"{}\"}}\n  }}\n",
        k.groq
    );
    let good_path = user.write(".cursor/mcp.json", &good, 0o600);
    let bad_path = user.write("project/.mcp.json", &bad, 0o600);
    let out = user.import(&["mcp", "--apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_no_keys_in(&out, &[&k.openai, &k.groq]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".mcp.json")
            && err.contains("is not valid JSON")
            && err.contains("line 5")
            && err.contains("Nothing was changed"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&good_path).expect("read"), good);
    assert_eq!(std::fs::read_to_string(&bad_path).expect("read"), bad);
    assert!(user.stored().is_empty());
}

/// A stdio MCP server in Python: `initialize`, then a `fetch_models` tool that calls the
/// provider with the key from its environment and reports what it saw.
const MCP_SERVER: &str = r#"
import json, os, sys, urllib.request, urllib.error

def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()

for line in sys.stdin:
    msg = json.loads(line)
    method, mid = msg.get("method"), msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "models", "version": "1.0"}}})
    elif method == "tools/call":
        key = os.environ.get("OPENAI_API_KEY", "")
        req = urllib.request.Request("https://api.openai.com/v1/models",
                                     headers={"Authorization": "Bearer " + key})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        with open("/proc/self/environ", "rb") as f:
            environ = f.read().decode(errors="replace")
        report = {"status": status, "body": body, "key": key,
                  "environ": environ + "\n" + "\n".join(f"{k}={v}" for k, v in os.environ.items())}
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "content": [{"type": "text", "text": json.dumps(report)}]}})
    elif mid is not None:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "no such method"}})
"#;

#[test]
fn a_rewrapped_stdio_server_starts_under_broker_run_with_the_placeholder() {
    let user = User::new();
    let k = Keys::new();
    let ca = TestCa::new();
    let origin = Origin::bearer(
        &ca,
        "api.openai.com",
        &k.openai,
        "{\"data\":[{\"id\":\"gpt-test\"}]}",
    );
    let script = user.dir.path().join("models_server.py");
    std::fs::write(&script, MCP_SERVER).expect("script");
    let config = format!(
        "{{\n  \"mcpServers\": {{\n    \"models\": {{\n      \"command\": \"python3\",\n      \"args\": [\"{}\"],\n      \"env\": {{\"OPENAI_API_KEY\": \"{}\"}}\n    }}\n  }}\n}}\n",
        script.display(),
        k.openai
    );
    let path = user.write("project/.mcp.json", &config, 0o644);
    user.import_ok(&["mcp", "--apply"]);

    // Start the server as an MCP client does: command, args and env from the config.
    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let server = &now["mcpServers"]["models"];
    // Rewrapped, or the server below would call the real api.openai.com with the placeholder.
    let broker = std::fs::canonicalize(broker_integration::broker_bin()).expect("broker path");
    assert_eq!(
        server["command"],
        broker.to_str().expect("utf-8 path"),
        "{now}"
    );
    assert_eq!(server["args"][0], "run", "{now}");
    assert_eq!(server["args"][1], "--", "{now}");
    assert_eq!(server["args"][2], "python3", "{now}");
    let mut cmd = Command::new(server["command"].as_str().expect("command"));
    scrub(&mut cmd);
    cmd.args(
        server["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("arg")),
    )
    .env("BROKER_HOME", user.home.path())
    .env("BROKER_KEY_SOURCE", "file")
    .env("BROKER_UPSTREAM_CA", &ca.pem_path)
    .env(
        "BROKER_RESOLVE",
        format!("api.openai.com:443:{}", origin.addr),
    )
    .env_remove("OPENAI_API_KEY")
    .current_dir(user.project())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (name, value) in server["env"].as_object().expect("env") {
        cmd.env(name, value.as_str().expect("env value"));
    }
    let mut child = cmd.spawn().expect("start the server");
    let mut stdin = child.stdin.take().expect("stdin");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Newline-delimited JSON-RPC, as the MCP stdio transport speaks it.
    let send = |stdin: &mut std::process::ChildStdin, msg: serde_json::Value| {
        writeln!(stdin, "{msg}").expect("write");
        stdin.flush().expect("flush");
    };
    let receive = || -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an answer from the server");
        serde_json::from_str(&line).expect("JSON-RPC")
    };
    send(
        &mut stdin,
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}}),
    );
    let init = receive();
    assert_eq!(init["result"]["serverInfo"]["name"], "models", "{init}");
    send(
        &mut stdin,
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    send(
        &mut stdin,
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "fetch_models", "arguments": {}}}),
    );
    let answer = receive();
    let report: serde_json::Value = serde_json::from_str(
        answer["result"]["content"][0]["text"]
            .as_str()
            .expect("tool text"),
    )
    .expect("report");
    drop(stdin);
    let _ = child.wait();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert_eq!(report["status"], 200, "{report}\n{stderr}");
    assert_eq!(
        report["key"],
        placeholder(&user.home, "openai"),
        "the server held the placeholder"
    );
    assert!(
        !report["environ"]
            .as_str()
            .expect("environ")
            .contains(&k.openai),
        "the real key was in the server's environment"
    );
    assert!(!stderr.contains(&k.openai));
    let requests = origin.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.header("authorization") == Some(format!("Bearer {}", k.openai).as_str())),
        "the origin did not get the real key"
    );
}
