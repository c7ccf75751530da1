//! `broker approve [ID] [--deny] [--yes]`: list the requests waiting for an approval (run,
//! command, method, host, path, the rule that asks), or answer one. Talks to every broker of
//! this `BROKER_HOME` (`approvals::sockets`); see `crate::approvals` for who may answer.
//!
//! Approving shows the request as the broker holds it and asks first (`--yes` skips the
//! question, and is needed without a terminal): the id a user types may come from a desktop
//! notice an agent faked, naming its own waiting request under another description.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;

use crate::approvals::{self, Reply, Waiting};
use crate::home::Home;

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The request to answer (as listed); without it, list the waiting requests.
    pub id: Option<String>,
    /// Deny the request instead of approving it.
    #[arg(long, requires = "id")]
    pub deny: bool,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
    /// Approve without asking (the request is still shown). Needed when standard input is
    /// not a terminal.
    #[arg(long, short = 'y', requires = "id", conflicts_with = "deny")]
    pub yes: bool,
}

pub fn run(args: ApproveArgs) -> anyhow::Result<ExitCode> {
    // An agent must not answer for itself: not from inside a run (its variables, or a
    // `broker run`/sandbox above it). The broker checks the process tree too.
    if let Some(why) = crate::hardening::inside_run() {
        bail!("broker approve is refused inside a broker run ({why}): approve from a terminal of your own");
    }
    let home = Home::from_env()?;
    let sockets = approvals::sockets(&home);
    match args.id {
        None => list(&sockets, args.json),
        Some(id) => answer(&sockets, &id, !args.deny, args.yes),
    }
}

fn list(sockets: &[(u32, std::path::PathBuf)], json: bool) -> anyhow::Result<ExitCode> {
    let mut waiting = Vec::new();
    for (_, path) in sockets {
        // A stale socket (a broker that died) answers nothing: skipped.
        if let Ok(Reply::Waiting { waiting: some }) = approvals::request(path, "list") {
            waiting.extend(some);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&waiting)?);
        return Ok(ExitCode::SUCCESS);
    }
    if waiting.is_empty() {
        println!("no request is waiting for approval");
    }
    for w in &waiting {
        println!("{}", describe(w));
    }
    if !waiting.is_empty() {
        println!("answer with 'broker approve ID' or 'broker approve ID --deny'");
    }
    Ok(ExitCode::SUCCESS)
}

/// One waiting request as the terminal shows it. Approving trusts this text, and the path and
/// command are the agent's: nothing in them may move the cursor or rewrite the line.
fn describe(w: &Waiting) -> String {
    use crate::notify::printable as p;
    format!(
        "{}  {} {}{}  run {} ({}), waiting {}s of {}s\n    rule: {}",
        p(&w.id),
        p(&w.method),
        p(&w.host),
        p(&w.path),
        p(&w.run),
        p(&w.command),
        w.waited,
        w.timeout,
        p(&w.rule)
    )
}

fn answer(
    sockets: &[(u32, std::path::PathBuf)],
    id: &str,
    approve: bool,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    let Some(pid) = id
        .split_once('.')
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
    else {
        bail!("'{id}' is not a request id (see 'broker approve')");
    };
    let Some((_, path)) = sockets.iter().find(|(p, _)| *p == pid) else {
        bail!("no broker with process id {pid} is running for this BROKER_HOME (see 'broker approve')");
    };
    if approve {
        // What the broker holds under this id, not what a notice said it was.
        let waiting = match approvals::request(path, "list")? {
            Reply::Waiting { waiting } => waiting,
            Reply::Error { error } => bail!("{error}"),
            Reply::Answered { .. } => bail!("the broker answered something else"),
        };
        let Some(request) = waiting.iter().find(|w| w.id == id) else {
            bail!("no request {id} is waiting (answered, timed out, or never asked; see 'broker approve')");
        };
        println!("{}", describe(request));
        if !yes && !confirmed()? {
            println!(
                "not approved; the request still waits (deny it with 'broker approve {id} --deny')"
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    let line = format!("{} {id}", if approve { "approve" } else { "deny" });
    match approvals::request(path, &line)? {
        Reply::Answered { request } => {
            println!(
                "{} {} {} {}{} (run {})",
                if approve { "approved" } else { "denied" },
                request.id,
                request.method,
                request.host,
                request.path,
                request.run
            );
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error { error } => bail!("{error}"),
        Reply::Waiting { .. } => bail!("the broker answered something else"),
    }
}

/// Ask on the terminal. Without one there is no one to ask: say how to approve anyway.
fn confirmed() -> anyhow::Result<bool> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if !std::io::stdin().is_terminal() {
        bail!("broker approve asks before approving, and standard input is not a terminal: add --yes to approve the request shown above");
    }
    print!("approve this request? [y/N] ");
    std::io::stdout().flush()?;
    let mut reply = String::new();
    std::io::stdin().lock().read_line(&mut reply)?;
    Ok(matches!(reply.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_request_cannot_rewrite_its_own_line() {
        let w = Waiting {
            id: "4242.1".into(),
            run: "run-1".into(),
            command: "sh -c x\r\u{1b}[2K4242.1  GET api.openai.com/v1/models".into(),
            method: "DELETE".into(),
            host: "api.openai.com".into(),
            path: "/v1/files/a\u{202e}".into(),
            rule: "DELETE /v1/files/*".into(),
            waited: 1,
            timeout: 60,
        };
        let shown = describe(&w);
        assert!(!shown.contains(['\r', '\u{1b}', '\u{202e}']), "{shown:?}");
        assert!(
            shown.starts_with("4242.1  DELETE api.openai.com/v1/files/a_  run run-1"),
            "{shown}"
        );
    }
}
