//! `broker audit [verify | reset --yes] [--follow] [--since 1h|RFC3339] [--json]`: read, check
//! and reset the audit log. Reading needs no key; `verify` and `reset` unlock the vault (the
//! chain is keyed by it, and it keeps the chain's head).
//!
//! Exit codes: 0 success (for `verify`: the chain is intact and reaches the vault's head); 1
//! error (for `verify`: the chain is broken, cut or replaced, and the first bad line is named).

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use crate::audit::{self, AuditEvent, AuditRecord, EventKind};
use crate::home::Home;
use crate::vault::Vault;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub action: Option<AuditAction>,
    /// Print the raw JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events as they are written (Ctrl-C to stop).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events since a time: a duration ago (`30s`, `15m`, `1h`, `2d`, `1w`) or RFC 3339.
    #[arg(long, value_name = "DURATION|RFC3339")]
    pub since: Option<String>,
    /// Show at most the last N events (default 50, or all with --since).
    #[arg(long, short = 'n', value_name = "N")]
    pub lines: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check the chain with the vault's key, and that the log reaches the head the vault
    /// recorded: prints the number of lines, or the first bad line (exit 1).
    Verify,
    /// Start a new chain past a log that does not verify (cut, replaced, a symlink): the old
    /// log is kept beside it, and the new chain's first line records the reset.
    Reset {
        /// Confirm: the new chain does not vouch for what the old log lost.
        #[arg(long)]
        yes: bool,
    },
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env().context("cannot locate BROKER_HOME")?;
    let path = home.audit_path();
    match args.action {
        Some(AuditAction::Verify) => return Ok(verify(&home)),
        Some(AuditAction::Reset { yes }) => return reset(&home, yes),
        None => {}
    }

    let since = args.since.as_deref().map(parse_since).transpose()?;
    let (lines, mut offset) = read_lines(&path)?;
    let total = offset_lines(&path);
    if total > lines.len() {
        eprintln!(
            "broker: {} line(s) of {} could not be read; run `broker audit verify`",
            total - lines.len(),
            path.display()
        );
    }
    let mut selected: Vec<&Line> = lines
        .iter()
        .filter(|l| {
            since
                .as_ref()
                .is_none_or(|s| l.record.time.as_str() >= s.as_str())
        })
        .collect();
    let limit = args.lines.or(if since.is_some() { None } else { Some(50) });
    if let Some(limit) = limit {
        let skip = selected.len().saturating_sub(limit);
        selected.drain(..skip);
    }
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<19}  {:<27} {:<24} DETAILS",
            "TIME (UTC)", "EVENT", "PROVIDER/PROFILE"
        )?;
    }
    for line in selected {
        print_line(&mut out, line, args.json)?;
    }
    out.flush()?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    drop(out);
    follow(&path, &mut offset, args.json)
}

/// `broker audit verify`.
fn verify(home: &Home) -> ExitCode {
    let path = home.audit_path();
    // Without a vault there is no key and no head: only format-1 lines can be checked, and a
    // keyed line is reported as such.
    let verified = match Vault::exists(home).then(|| Vault::open(home)) {
        None => audit::verify(&path, None, None),
        Some(Ok(vault)) => audit::verify_with(&path, &vault),
        Some(Err(err)) => {
            println!(
                "audit log NOT CHECKED: the chain is keyed by the vault, which cannot be unlocked: {err}"
            );
            return ExitCode::FAILURE;
        }
    };
    match verified {
        Ok(report) => {
            println!("audit log OK: {report} ({})", path.display());
            ExitCode::SUCCESS
        }
        Err(broken) => {
            println!(
                "audit log BROKEN at line {}: {} ({})",
                broken.line,
                broken.reason,
                path.display()
            );
            println!(
                "to start a new chain past it: broker audit reset --yes (the old log is kept, and the reset is audited)"
            );
            ExitCode::FAILURE
        }
    }
}

/// `broker audit reset --yes`.
fn reset(home: &Home, yes: bool) -> anyhow::Result<ExitCode> {
    let path = home.audit_path();
    if !yes {
        bail!(
            "this moves {} aside and starts a new audit chain, which does not vouch for anything \
             the old log lost. Check it first with `broker audit verify`, then run `broker audit \
             reset --yes`",
            path.display()
        );
    }
    let vault = Vault::open(home).context("the audit chain is keyed by the vault")?;
    let uid = rustix::process::getuid().as_raw();
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let who = match user.is_empty() {
        true => format!("uid {uid}"),
        false => format!("{user} (uid {uid})"),
    };
    let event = AuditEvent {
        pid: Some(std::process::id()),
        command: Some("broker audit reset --yes".into()),
        reason: Some(format!("reset by {who}")),
        ..AuditEvent::new(EventKind::AuditReset)
    };
    let outcome = audit::reset(home, &vault, event)?;
    match &outcome.kept_as {
        Some(kept) => eprintln!("the old audit log is kept as {}", kept.display()),
        None => eprintln!("there was no audit log at {}", path.display()),
    }
    if let Err(broken) = &outcome.old_state {
        eprintln!("it did not verify: {broken}");
    }
    eprintln!(
        "started a new audit chain in {}; its first line records the reset: {}",
        path.display(),
        outcome.record.event.reason.as_deref().unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

struct Line {
    raw: String,
    record: AuditRecord,
}

/// Every parseable line, and the byte offset where complete lines end.
fn read_lines(path: &Path) -> anyhow::Result<(Vec<Line>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Ok((parse_lines(&bytes[..end]), end as u64))
}

/// Number of non-empty lines in the log (0 if unreadable).
fn offset_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.split(|c| *c == b'\n').filter(|l| !l.is_empty()).count())
        .unwrap_or(0)
}

fn parse_lines(bytes: &[u8]) -> Vec<Line> {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|raw| {
            let raw = std::str::from_utf8(raw).ok()?;
            let record = serde_json::from_str::<AuditRecord>(raw).ok()?;
            Some(Line {
                raw: raw.to_string(),
                record,
            })
        })
        .collect()
}

/// Poll for appended lines. The log is small and appends are rare: polling is simpler than
/// inotify and works on every filesystem.
fn follow(path: &Path, offset: &mut u64, json: bool) -> anyhow::Result<ExitCode> {
    let mut pending = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let Ok(mut file) = std::fs::File::open(path) else {
            continue;
        };
        let len = file.metadata()?.len();
        if len < *offset {
            // Truncated or replaced: start over from its beginning.
            *offset = 0;
            pending.clear();
        }
        if len == *offset {
            continue;
        }
        file.seek(SeekFrom::Start(*offset))?;
        let mut chunk = Vec::new();
        file.take(len - *offset).read_to_end(&mut chunk)?;
        *offset += chunk.len() as u64;
        pending.extend_from_slice(&chunk);
        if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = pending.drain(..=end).collect();
            let mut out = std::io::stdout().lock();
            for line in parse_lines(&complete) {
                print_line(&mut out, &line, json)?;
            }
            out.flush()?;
        }
    }
}

fn print_line(out: &mut impl std::io::Write, line: &Line, json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", line.raw);
    }
    let r = &line.record;
    let e = &r.event;
    let who = match (&e.provider, &e.profile) {
        (Some(p), Some(f)) => format!("{p}/{f}"),
        (Some(p), None) => p.clone(),
        _ => "-".into(),
    };
    let mut details = Vec::new();
    if let Some(m) = &e.method {
        details.push(m.clone());
    }
    match (&e.host, &e.path) {
        (Some(h), Some(p)) => details.push(format!("{h}{p}")),
        (Some(h), None) => details.push(h.clone()),
        (None, Some(p)) => details.push(p.clone()),
        (None, None) => {}
    }
    if let Some(s) = e.status {
        details.push(format!("-> {s}"));
    }
    if let Some(b) = e.bytes {
        details.push(format!("{b}B"));
    }
    if let Some(l) = e.latency_ms {
        details.push(format!("{l}ms"));
    }
    if let Some(s) = &e.sni {
        details.push(format!("sni={s}"));
    }
    if let Some(r) = &e.reason {
        details.push(format!("({r})"));
    }
    if let Some(run) = &e.run_id {
        details.push(format!("run={run}"));
    }
    if let Some(pid) = e.pid {
        details.push(format!("pid={pid}"));
    }
    if let Some(c) = &e.command {
        details.push(format!("cmd={c:?}"));
    }
    writeln!(
        out,
        "{:<19}  {:<27} {:<24} {}",
        super::credentials::short_time(&r.time),
        e.event.as_str(),
        who,
        details.join(" ")
    )
}

/// `--since`: a duration ago or an RFC 3339 time, as a comparable log timestamp.
fn parse_since(s: &str) -> anyhow::Result<String> {
    let s = s.trim();
    if let Some(secs) = parse_duration_secs(s) {
        let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs);
        return Ok(audit::format_rfc3339(t));
    }
    match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        Ok(t) => Ok(audit::format_rfc3339(t)),
        Err(_) => bail!(
            "--since {s:?}: expected a duration like 30s, 15m, 1h, 2d, 1w, or an RFC 3339 time \
             like 2025-01-31T12:00:00Z"
        ),
    }
}

fn parse_duration_secs(s: &str) -> Option<i64> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "s" | "sec" | "secs" => 1,
        "m" | "min" | "mins" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 604_800,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_durations_and_times() {
        assert_eq!(parse_duration_secs("90s"), Some(90));
        assert_eq!(parse_duration_secs("1h"), Some(3600));
        assert_eq!(parse_duration_secs("2d"), Some(172_800));
        assert_eq!(parse_duration_secs("h"), None);
        assert_eq!(parse_duration_secs("5y"), None);
        assert_eq!(
            parse_since("2025-01-31T13:00:00+01:00").unwrap(),
            "2025-01-31T12:00:00.000Z"
        );
        assert!(parse_since("yesterday").is_err());
    }
}
