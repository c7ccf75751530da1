//! The providers' own SDKs accept broker's placeholders (issue 22's catalog promise).
//!
//! Some SDKs check a key's prefix or length before sending anything, so a placeholder of the
//! wrong shape would break an agent that uses them. Each case runs one official SDK (Python:
//! tests/sdk/cases.py, Node: tests/sdk/cases.mjs, at the versions pinned next to them) under
//! `broker run`, with the key read from the environment where the broker put the placeholder,
//! and makes one call to the provider's real hostname. A local TLS origin stands in for every
//! provider (`--resolve`) and answers `{}`. The case passes when the origin received a request
//! for one of that provider's hosts carrying the real key, no request carried the placeholder,
//! and the agent's output never held the real key. CA variables alternate between scrubbed
//! and preset from case to case.
//!
//! The SDKs come from `scripts/test` (a venv and a Node project under target/clients, named
//! by `BROKER_TEST_SDK_CLIENTS`); without it each test prints a SKIP line.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use broker_integration::{preset_ca_vars, run_bounded, shim_lib, Home, Origin, Reply, TestCa};

/// One SDK call: the case's name in cases.py / cases.mjs and the catalog provider it uses.
struct Case {
    name: &'static str,
    provider: &'static str,
}

const fn case(name: &'static str, provider: &'static str) -> Case {
    Case { name, provider }
}

const PYTHON_CASES: &[Case] = &[
    case("anthropic", "anthropic"),
    case("groq", "groq"),
    case("together", "together"),
    case("cerebras", "cerebras"),
    case("mistral", "mistral"),
    case("cohere", "cohere"),
    case("gemini", "gemini"),
    case("huggingface", "huggingface"),
    case("stripe", "stripe"),
    case("slack", "slack"),
    case("tavily", "tavily"),
    case("exa", "exa"),
    case("replicate", "replicate"),
    case("voyage", "voyage"),
    case("elevenlabs", "elevenlabs"),
    case("deepgram", "deepgram"),
    case("resend", "resend"),
    case("sendgrid", "sendgrid"),
    case("github", "github"),
    case("gitlab", "gitlab"),
    case("notion", "notion"),
    case("firecrawl", "firecrawl"),
    case("langsmith", "langsmith"),
    case("zhipu", "zhipu"),
    case("hetzner", "hetzner-cloud"),
    case("todoist", "todoist"),
    case("assemblyai", "assemblyai"),
    case("writer", "writer"),
    case("ai21", "ai21"),
    case("browserbase", "browserbase"),
    case("dashscope", "dashscope"),
];

const NODE_CASES: &[Case] = &[
    case("anthropic", "anthropic"),
    case("groq", "groq"),
    case("cerebras", "cerebras"),
    case("together", "together"),
    case("mistral", "mistral"),
    case("cohere", "cohere"),
    case("gemini", "gemini"),
    case("huggingface", "huggingface"),
    case("stripe", "stripe"),
    case("slack", "slack"),
    case("notion", "notion"),
    case("github", "github"),
    case("resend", "resend"),
    case("replicate", "replicate"),
    case("linear", "linear"),
    case("tavily", "tavily"),
    case("exa", "exa"),
    case("elevenlabs", "elevenlabs"),
    case("deepgram", "deepgram"),
    case("sendgrid", "sendgrid"),
];

/// A provider as the catalog describes it: its placeholder, a real-looking key of the same
/// shape, and its exact host names (wildcards cannot be resolved).
struct Provider {
    placeholder: String,
    key: String,
    hosts: Vec<String>,
}

fn provider(home: &Home, name: &str) -> Provider {
    let out = home.broker_ok(&["providers", "show", name, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("providers json");
    let placeholder = json["placeholder"]
        .as_str()
        .expect("placeholder")
        .to_string();
    // Same length and character classes as the placeholder, so it fits the key pattern.
    let key = placeholder.replace("placeholder", "realsecret1");
    assert_ne!(
        key, placeholder,
        "{name}'s placeholder has no 'placeholder' in it"
    );
    let hosts = json["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .flat_map(|route| route["hosts"].as_array().expect("hosts").iter())
        .map(|host| host["pattern"].as_str().expect("pattern").to_string())
        .filter(|host| !host.contains('*'))
        .collect();
    Provider {
        placeholder,
        key,
        hosts,
    }
}

/// The SDK clients scripts/test installed, or why this test skips.
fn sdk_clients(test: &str) -> Option<PathBuf> {
    match std::env::var_os("BROKER_TEST_SDK_CLIENTS") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            let why = format!(
                "SKIP {test}: BROKER_TEST_SDK_CLIENTS is not set (./scripts/test installs the SDKs)"
            );
            println!("{why}");
            broker_integration::skip(&why);
            None
        }
    }
}

/// Run every case of one language; `agent(case)` is the SDK program's command line.
fn drive(cases: &[Case], agent: impl Fn(&Case) -> Command) {
    let _ = shim_lib();
    // BROKER_TEST_SDK_ONLY=a,b runs only those cases (for working on one SDK).
    let only = std::env::var("BROKER_TEST_SDK_ONLY").ok();
    let cases: Vec<&Case> = cases
        .iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == c.name))
        })
        .collect();
    let ca = TestCa::new();
    let home = Home::new();
    let providers: Vec<Provider> = cases.iter().map(|c| provider(&home, c.provider)).collect();
    for (case, provider) in cases.iter().zip(&providers) {
        home.add(case.provider, &provider.key);
    }
    let names: BTreeSet<&str> = providers
        .iter()
        .flat_map(|p| p.hosts.iter().map(String::as_str))
        .collect();
    let names: Vec<&str> = names.into_iter().collect();
    let origin = Origin::start(&ca, &names, |_| Reply::Json(200, "{}".into()));

    let mut failures = Vec::new();
    for (i, (case, provider)) in cases.iter().zip(&providers).enumerate() {
        let before = origin.requests().len();
        let mut cmd = home.broker();
        cmd.arg("run").arg("--upstream-ca").arg(&ca.pem_path);
        for host in &provider.hosts {
            cmd.arg("--resolve")
                .arg(format!("{host}:443:{}", origin.addr));
        }
        let sdk = agent(case);
        cmd.arg("--").arg(sdk.get_program()).args(sdk.get_args());
        if let Some(dir) = sdk.get_current_dir() {
            cmd.current_dir(dir);
        }
        let presets = i % 2 == 1;
        if presets {
            preset_ca_vars(&mut cmd);
        }
        let out = run_bounded(&mut cmd, Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ca_vars = if presets { "preset" } else { "scrubbed" };
        if stdout.contains(&provider.key) || stderr.contains(&provider.key) {
            failures.push(format!(
                "{}: the agent's output held the real key",
                case.name
            ));
            continue;
        }
        let requests = &origin.requests()[before..];
        let placeholder_sent = requests.iter().any(|r| {
            r.headers
                .iter()
                .any(|(_, v)| v.contains(&provider.placeholder))
                || r.target.contains(&provider.placeholder)
        });
        let real_key_sent = requests.iter().any(|r| {
            let host = r.authority.split(':').next().unwrap_or_default();
            provider.hosts.iter().any(|h| h == host)
                && (r.headers.iter().any(|(_, v)| v.contains(&provider.key))
                    || r.target.contains(&provider.key))
        });
        println!(
            "{} ({ca_vars} CA variables): {} request(s); {}",
            case.name,
            requests.len(),
            stdout.trim()
        );
        if placeholder_sent {
            failures.push(format!("{}: the placeholder reached the origin", case.name));
        } else if !real_key_sent {
            failures.push(format!(
                "{} ({ca_vars} CA variables): no request with the real key reached {:?} \
                 (the SDK refused the placeholder, or never called); exit {:?}\n{stdout}{stderr}",
                case.name, provider.hosts, out.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn python_sdks_accept_the_placeholder_and_their_provider_gets_the_real_key() {
    let Some(clients) = sdk_clients("python SDKs") else {
        return;
    };
    let python = clients.join("sdk-venv/bin/python");
    assert!(python.exists(), "{} is missing", python.display());
    let cases_py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/cases.py");
    drive(PYTHON_CASES, |case| {
        let mut cmd = Command::new(&python);
        cmd.arg(&cases_py).arg(case.name);
        cmd
    });
}

#[test]
fn node_sdks_accept_the_placeholder_and_their_provider_gets_the_real_key() {
    let Some(clients) = sdk_clients("node SDKs") else {
        return;
    };
    let modules = clients.join("sdk-node/node_modules");
    assert!(modules.is_dir(), "{} is missing", modules.display());
    // ESM resolves packages from the script's own directory: put the script beside a link to
    // the installed project's node_modules.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/cases.mjs"),
        dir.path().join("cases.mjs"),
    )
    .expect("copy cases.mjs");
    std::os::unix::fs::symlink(&modules, dir.path().join("node_modules")).expect("symlink");
    let script = dir.path().join("cases.mjs");
    drive(NODE_CASES, |case| {
        let mut cmd = Command::new("node");
        cmd.arg(&script).arg(case.name).current_dir(dir.path());
        cmd
    });
}
