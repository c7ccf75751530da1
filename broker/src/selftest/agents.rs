//! The agent CLIs the self-test runs, each making one model call in its non-interactive mode
//! against the fake provider: how each is started, and what it needs in its throwaway HOME so
//! that nothing reaches past the fake provider (telemetry, update checks, model catalogs).
//! The same settings as the integration tests (`tests/tests/agents.rs`), which found them.
//! Then the probe of each (started as `broker run` starts an agent) and its verdict.

use std::path::Path;
use std::process::Command;

use super::fake_llm::Provider;
use super::{first_line, Finished, Probe, Seen, SelfTest};
use crate::launch;

/// The prompt every CLI is given; the fake answers any prompt the same way.
pub const PROMPT: &str = "Reply with the single word pong.";

/// One agent CLI.
pub struct AgentCli {
    /// The command looked up on `PATH`, and the check's name.
    pub name: &'static str,
    pub provider: Provider,
    pub args: &'static [&'static str],
    /// Variables for it (`{HOME}` is its throwaway HOME), on top of HOME and the XDG
    /// directories, which point into that HOME.
    pub env: &'static [(&'static str, &'static str)],
    /// Files to write, relative to the throwaway HOME.
    pub files: &'static [(&'static str, &'static str)],
}

/// Every agent CLI the self-test knows, in the order it runs them.
pub const AGENTS: &[AgentCli] = &[
    AgentCli {
        name: "claude",
        provider: Provider::Anthropic,
        args: &["-p", PROMPT],
        env: &[
            // One switch for telemetry, error reporting, the auto-updater and the other
            // non-essential requests.
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("DISABLE_TELEMETRY", "1"),
            ("DISABLE_ERROR_REPORTING", "1"),
            ("CLAUDE_CONFIG_DIR", "{HOME}/.claude"),
        ],
        files: &[],
    },
    AgentCli {
        // Its npm launcher starts a static musl binary, which the shim's exec hooks send
        // through the CONNECT listener; its model call goes over the Responses WebSocket.
        name: "codex",
        provider: Provider::OpenAi,
        args: &["exec", "--skip-git-repo-check", PROMPT],
        env: &[("CODEX_HOME", "{HOME}/.codex")],
        files: &[(
            ".codex/config.toml",
            "check_for_update_on_startup = false\n[analytics]\nenabled = false\n",
        )],
    },
    AgentCli {
        name: "gemini",
        provider: Provider::Gemini,
        args: &["-p", PROMPT],
        env: &[
            ("GEMINI_TELEMETRY_ENABLED", "false"),
            // Headless runs refuse an untrusted folder; the throwaway project is trusted.
            ("GEMINI_CLI_TRUST_WORKSPACE", "true"),
        ],
        files: &[(
            ".gemini/settings.json",
            // The API key (not a Google login), no usage statistics, no update checks.
            r#"{
  "security": { "auth": { "selectedType": "gemini-api-key" } },
  "privacy": { "usageStatisticsEnabled": false },
  "general": { "disableAutoUpdate": true, "disableUpdateNag": true },
  "telemetry": { "enabled": false }
}"#,
        )],
    },
    AgentCli {
        name: "opencode",
        provider: Provider::OpenAi,
        args: &["run", "--model", "openai/gpt-4o-mini", PROMPT],
        env: &[
            // Its model catalog comes from models.dev, its plugins from npm and its updates
            // from GitHub: none of that is the provider.
            ("OPENCODE_DISABLE_MODELS_FETCH", "1"),
            ("OPENCODE_DISABLE_AUTOUPDATE", "1"),
            ("OPENCODE_DISABLE_DEFAULT_PLUGINS", "1"),
            ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1"),
        ],
        files: &[],
    },
    AgentCli {
        name: "aider",
        provider: Provider::OpenAi,
        args: &[
            "--message",
            PROMPT,
            "--yes-always",
            "--model",
            "gpt-4o-mini",
            "--no-git",
            // No PyPI version check, no analytics, no release notes.
            "--no-check-update",
            "--analytics-disable",
            "--no-show-release-notes",
            "--no-pretty",
            "--no-stream",
        ],
        // litellm fetches its model price list from GitHub at import without this.
        env: &[("LITELLM_LOCAL_MODEL_COST_MAP", "True")],
        files: &[],
    },
    AgentCli {
        name: "llm",
        provider: Provider::OpenAi,
        args: &["-m", "gpt-4o-mini", PROMPT],
        // Its logs database and keys file in the throwaway HOME.
        env: &[("LLM_USER_PATH", "{HOME}/.llm")],
        files: &[],
    },
];

/// Variables from the user's environment that would send a CLI somewhere other than the
/// provider's host (and so around the self-test's origin), or give it another credential.
pub const REDIRECTING_VARS: &[&str] = &[
    "OPENAI_BASE_URL",
    "OPENAI_API_BASE",
    "OPENAI_ORG_ID",
    "OPENAI_ORGANIZATION",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_MODEL",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GEMINI_MODEL",
    "AIDER_MODEL",
    "LLM_MODEL",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "NODE_OPTIONS",
];

impl SelfTest {
    /// `agent` (found at `program`) making one model call, started as `broker run` starts an
    /// agent: every placeholder in its environment, and the shim (or, for a program the shim
    /// cannot reach, the CONNECT listener) attached the same way. In a throwaway HOME under
    /// the self-test's scratch directory, with its telemetry and update checks off.
    pub(super) fn agent_probe(
        &self,
        agent: &'static AgentCli,
        program: &Path,
        lib: &Path,
    ) -> Probe {
        let shown = format!("{} {}", agent.name, agent.args.join(" "));
        let prepared = || -> anyhow::Result<(Command, Option<String>)> {
            let home = self.scratch.join("agents").join(agent.name);
            let project = home.join("project");
            std::fs::create_dir_all(&project)?;
            let h = home.to_string_lossy();
            for (file, text) in agent.files {
                let path = home.join(file);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, text.replace("{HOME}", &h))?;
            }
            let mut c = Command::new(program);
            c.args(agent.args).current_dir(&project);
            for var in REDIRECTING_VARS {
                c.env_remove(var);
            }
            c.env("HOME", &home)
                .env("XDG_CONFIG_HOME", home.join(".config"))
                .env("XDG_DATA_HOME", home.join(".local/share"))
                .env("XDG_STATE_HOME", home.join(".local/state"))
                .env("XDG_CACHE_HOME", home.join(".cache"))
                // No colours or terminal tricks in captured output.
                .env("NO_COLOR", "1")
                .env("TERM", "dumb");
            for (var, value) in agent.env {
                c.env(var, value.replace("{HOME}", &h));
            }
            let shim = &self.instance.shim;
            for (var, placeholder) in &shim.env {
                c.env(var, placeholder);
            }
            // A real key of the user's there must not reach the CLI; and Gemini CLI warns
            // when both of Google's variables are set.
            for (var, _) in &shim.env_if_set {
                c.env_remove(var);
            }
            launch::scrub_broker_secrets(&mut c);
            let target = launch::inspect_target(program);
            let via = launch::attach(
                &mut c,
                &target,
                Some(lib),
                shim,
                &self.instance.shim_config_path,
            )?;
            Ok((c, via))
        };
        let (command, via) = match prepared() {
            Ok((c, via)) => (Ok(c), via),
            Err(err) => (Err(format!("{err:#}")), None),
        };
        Probe {
            name: agent.name,
            command,
            shown,
            transparent: true,
            agent: Some((agent.provider, via)),
        }
    }
}

/// An agent CLI passed when it printed the fake provider's answer (which the origin gives
/// only for the real key), every request it made to its provider carried the real key, it
/// exited 0, and nothing it printed holds a key.
pub(super) fn verdict(
    provider: Provider,
    via_connect: bool,
    received: &[Seen],
    out: &Finished,
    leaked: bool,
) -> (bool, String) {
    let to_provider: Vec<&Seen> = received
        .iter()
        .filter(|s| s.host == provider.host())
        .collect();
    let without_key = to_provider.iter().filter(|s| !s.real_key).count();
    let answered = out.stdout.contains(provider.answer());
    let detail = if leaked {
        "the agent printed a real key".to_string()
    } else if to_provider.is_empty() {
        format!(
            "nothing reached {}: {}",
            provider.host(),
            first_line(&out.stderr, &out.stdout)
        )
    } else if without_key > 0 {
        format!(
            "{without_key} of {} requests reached {} without the real key",
            to_provider.len(),
            provider.host()
        )
    } else if !answered || !out.success {
        format!(
            "the agent did not print the answer or failed ({}): {}",
            if out.success { "exit 0" } else { "failed" },
            first_line(&out.stderr, &out.stdout)
        )
    } else {
        format!(
            "answered in {:.1}s; {} got the made-up key on: {} ({})",
            out.took.as_secs_f64(),
            provider.host(),
            summary(&to_provider),
            if via_connect {
                "started on the CONNECT fallback"
            } else {
                "started under libbroker.so"
            },
        )
    };
    (
        !leaked && !to_provider.is_empty() && without_key == 0 && answered && out.success,
        detail,
    )
}

/// What a CLI asked for: each `METHOD path` (the query cut off) once, with a count when it
/// asked more than once.
fn summary(requests: &[&Seen]) -> String {
    let mut asked: Vec<(String, usize)> = Vec::new();
    for seen in requests {
        let path = seen.target.split('?').next().unwrap_or_default();
        let ws = if seen.websocket { " (websocket)" } else { "" };
        let line = format!("{} {path}{ws}", seen.method);
        match asked.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += 1,
            None => asked.push((line, 1)),
        }
    }
    asked
        .into_iter()
        .map(|(line, n)| match n {
            1 => line,
            n => format!("{line} x{n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
