//! What evaluating a run's policy adds to one request: a 20-rule policy for openai, checked
//! (path normalised, rules matched, budgets charged) the way the handler does per request.
//!
//! ```text
//! cargo run --release -p broker-cli --example policy_cost
//! ```
//!
//! Reports nanoseconds per request (wall clock, and CPU time, which a loaded machine does not
//! inflate) for an allowed path, a path with dot segments and
//! parameters, a query checked by a query rule (already canonical, and re-encoded), and a
//! refused one (the target is under 2 µs). It asserts nothing.

use std::hint::black_box;
use std::time::Instant;

use broker_cli::policy::{file, RunPolicy};
use broker_cli::providers::Catalog;

const POLICY: &str = r#"
[run]
requests_per_minute = 1000000000
[providers.openai]
requests_per_minute = 1000000000
max_body_bytes = 10485760
allow = [
  "GET /v1/models", "GET /v1/models/*", "POST /v1/responses", "GET /v1/responses",
  "GET /v1/responses/*", "DELETE /v1/responses/*", "POST /v1/chat/completions",
  "POST /v1/embeddings", "POST /v1/moderations", "GET /v1/files?purpose=batch|fine-tune&limit=*&after=*", "POST /v1/files",
  "GET /v1/files/*", "GET /v1/files/*/content", "POST /v1/audio/speech",
  "POST /v1/audio/transcriptions", "POST /v1/images/generations", "GET /v1/batches",
  "POST /v1/batches", "GET /v1/batches/*", "POST /v1/vector_stores/*/files",
]
"#;

fn main() {
    let catalog = Catalog::builtin();
    let layer = file::parse(POLICY, "bench.toml", &catalog).expect("policy");
    let policy = RunPolicy::compile(&[layer], |_| "default", None);
    for (label, method, path, query) in [
        (
            "allowed, last rule",
            "POST",
            "/v1/vector_stores/vs_1/files",
            None,
        ),
        ("allowed, first rule", "GET", "/v1/models", None),
        (
            "dot segments and ;",
            "GET",
            "/v1/x/../files/f;a=b/./content",
            None,
        ),
        (
            "query rule",
            "GET",
            "/v1/files",
            Some("purpose=batch&limit=20&after=file-abc"),
        ),
        (
            "query re-encoded",
            "GET",
            "/v1/files",
            Some("purpose=b%61tch&limit=2+0"),
        ),
        ("refused", "PUT", "/v1/admin/users", None),
    ] {
        let rounds = 1_000_000u32;
        let cpu_before = cpu_ns();
        let started = Instant::now();
        for _ in 0..rounds {
            let verdict = policy.check_rules(
                black_box("openai"),
                black_box(method),
                black_box(path),
                black_box(query),
            );
            let charged = policy.charge("openai", Some(512), Instant::now());
            black_box((verdict.is_ok(), charged.is_ok()));
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(rounds);
        let cpu = (cpu_ns() - cpu_before) as f64 / f64::from(rounds);
        println!(
            "{label:<22} {method} {:<36} {ns:>6.0} ns wall, {cpu:>6.0} ns CPU per request",
            match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            }
        );
    }
}

/// CPU time this thread has used, in nanoseconds (`/proc/thread-self/schedstat`): on a busy
/// machine the wall clock also counts the time other processes had the core.
fn cpu_ns() -> u128 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
