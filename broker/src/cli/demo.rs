//! `broker demo`: the whole flow, offline, in a throwaway `BROKER_HOME`.
//!
//! A local TLS origin plays `api.openai.com` and answers 200 only to the real (made-up) key;
//! the key goes into a fresh vault; a real client (curl, else python3) runs as the agent with
//! the placeholder in `OPENAI_API_KEY`, preloaded with `libbroker.so`; the demo prints what the
//! agent held next to what the origin received, and exits 0 only if the swap really happened
//! and the agent never saw the key.

use std::process::ExitCode;

use clap::Args;

use crate::selftest::{SelfTest, HOST};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the throwaway BROKER_HOME and print where it is.
    #[arg(long)]
    pub keep: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new().prefix("broker-demo-").tempdir()?;
    let runtime = super::runtime()?;
    let result = runtime.block_on(demo(dir.path()));
    if args.keep {
        let kept = dir.keep();
        println!(
            "\nkept the demo BROKER_HOME at {}",
            kept.join("home").display()
        );
    }
    result
}

async fn demo(scratch: &std::path::Path) -> anyhow::Result<ExitCode> {
    println!("broker demo: the whole flow, offline, in a throwaway BROKER_HOME\n");
    let test = SelfTest::start(scratch, "demo").await?;
    println!(
        "1. a local origin plays https://{HOST} ({}) and accepts only the real key",
        test.origin.addr
    );
    println!(
        "2. the real key is sealed in the vault: {}…  (made up for this demo)",
        &test.key[..12]
    );
    println!(
        "3. the broker listens on 127.77.1.x:{} with a CA limited to managed hosts",
        test.instance.shim.port
    );
    let Some(probe) = test.probes().into_iter().next() else {
        anyhow::bail!("broker demo needs curl or python3 to play the agent; install one (apt-get install curl)");
    };
    println!("4. the agent runs with OPENAI_API_KEY={}", test.placeholder);
    println!(
        "   $ {}{}",
        probe.shown,
        if probe.transparent {
            "   # LD_PRELOAD=libbroker.so"
        } else {
            ""
        }
    );
    let transparent = probe.transparent;
    let test = std::sync::Arc::new(test);
    let checker = test.clone();
    let result = tokio::task::spawn_blocking(move || checker.check(probe)).await?;

    let held = format!("OPENAI_API_KEY={}", test.placeholder);
    let width = held.len().max(20);
    let received = result.origin_auth.as_deref().unwrap_or("(nothing arrived)");
    println!();
    println!(
        "   {:<width$}   what the origin received",
        "what the agent held"
    );
    println!("   {held:<width$}   Authorization: {received}");
    println!();
    // The fake provider's model list is one long JSON line: its start shows what arrived.
    let got = result.stdout.lines().next().unwrap_or("(no output)");
    let shown: String = got.chars().take(100).collect();
    let more = if shown.len() < got.len() { "…" } else { "" };
    println!("   the agent got: {shown}{more}");

    if result.ok {
        println!("\nok: the origin got the real key; the agent only ever held the placeholder.");
        if !transparent {
            println!("(libbroker.so was not found next to the broker binary, so the agent was pointed at the broker explicitly; build the workspace to see the transparent path)");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("\nbroker demo: FAILED: {}", result.detail);
        Ok(ExitCode::FAILURE)
    }
}
