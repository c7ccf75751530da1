//! The agent CLIs the self-test runs, each making one model call in its non-interactive mode
//! against the fake provider: how each is started, and what it needs in its throwaway HOME so
//! that nothing reaches past the fake provider (telemetry, update checks, model catalogs).
//! The same settings as the integration tests (`tests/tests/agents.rs`), which found them.

use super::fake_llm::Provider;

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
