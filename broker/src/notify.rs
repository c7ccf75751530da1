//! A desktop notification when a request starts waiting for `broker approve`, where one can be
//! shown: a session D-Bus (`DBUS_SESSION_BUS_ADDRESS`, or `$XDG_RUNTIME_DIR/bus`) and
//! `notify-send` on the broker's `PATH` (libnotify, which talks to
//! org.freedesktop.Notifications). Anything else is a silent no-op: `broker approve` lists the
//! request either way.
//!
//! Never on the request path: `notify-send` is started and reaped on a thread of its own, at
//! most one at a time (a burst of waiting requests is one notification; the rest are in the
//! list), and killed if it has not finished in [`NOTIFY_TIMEOUT`]. The text holds what
//! `broker approve` lists (method, host, path, run, command, rule, id): the path and command
//! are the agent's, before any swap, so they carry placeholders, never a key; they are cut
//! short and stripped of markup and control characters, so an agent cannot dress its request
//! up as something else in the notification.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::approvals::Waiting;

/// How long `notify-send` may take before it is killed.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest path or command shown (the rest is in `broker approve`).
const SHOWN: usize = 120;

static IN_FLIGHT: AtomicBool = AtomicBool::new(false);

/// Tell the desktop that `waiting` needs an answer, if there is a desktop to tell.
pub fn approval_waiting(waiting: &Waiting) {
    if !session_bus() {
        return;
    }
    if IN_FLIGHT.swap(true, Ordering::AcqRel) {
        return;
    }
    let (summary, body) = text(waiting);
    let spawned = std::thread::Builder::new()
        .name("notify-send".into())
        .spawn(move || {
            send(&summary, &body);
            IN_FLIGHT.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        IN_FLIGHT.store(false, Ordering::Release);
    }
}

/// The variables notify-send gets from the broker: where it is, and how it reaches the bus.
const NOTIFIER_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "DBUS_SESSION_BUS_ADDRESS",
    "XDG_RUNTIME_DIR",
    "DISPLAY",
    "WAYLAND_DISPLAY",
];

/// Is there a session bus a notification could go to?
fn session_bus() -> bool {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|dir| {
        use std::os::unix::fs::FileTypeExt as _;
        std::fs::metadata(std::path::Path::new(&dir).join("bus"))
            .is_ok_and(|m| m.file_type().is_socket())
    })
}

fn send(summary: &str, body: &str) {
    let mut cmd = Command::new("notify-send");
    // Only what reaching the desktop needs: the broker's environment may hold what the user's
    // shell exported (keys a `broker serve` was started with), and notify-send, unlike the
    // broker, is a process the agent's user can read (/proc/<pid>/environ).
    cmd.env_clear();
    for name in NOTIFIER_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let child = cmd
        .args(["--app-name=broker", "--urgency=critical", "--"])
        .arg(summary)
        .arg(body)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            tracing::debug!(error = %e, "no desktop notification (notify-send)");
            return;
        }
    };
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

/// The notification's summary and body.
fn text(w: &Waiting) -> (String, String) {
    let summary = format!(
        "broker: {} to {} waits for approval",
        shown(&w.method),
        shown(&w.host)
    );
    let body = format!(
        "{} {}\nrun {} ({})\nrule {}\nbroker approve {} (or --deny) within {} s",
        shown(&w.method),
        shown(&w.path),
        shown(&w.run),
        shown(&w.command),
        shown(&w.rule),
        shown(&w.id),
        w.timeout
    );
    (summary, body)
}

/// `text` cut to [`SHOWN`] characters, without control characters or markup (notification
/// servers may read `<b>`, `<a href>`, `&amp;`).
fn shown(text: &str) -> String {
    let mut out: String = printable(text)
        .chars()
        .map(|c| if matches!(c, '<' | '>' | '&') { '_' } else { c })
        .take(SHOWN)
        .collect();
    if text.chars().count() > SHOWN {
        out.push('…');
    }
    out
}

/// `text` with every character but printable ASCII and the space replaced by `_`: beyond the
/// control characters (a terminal's escapes, `\r`), Unicode has line separators (U+2028),
/// direction overrides (U+202E) and zero-width characters with which a path or a command
/// could fake a line of a notice or of `broker approve`'s listing, or reorder it.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_says_what_broker_approve_lists_without_markup() {
        let w = Waiting {
            id: "4242.1".into(),
            run: "run-7".into(),
            command: "python agent.py <b>harmless</b>\nreally".into(),
            method: "DELETE".into(),
            host: "api.openai.com".into(),
            path: format!("/v1/files/{}", "x".repeat(300)),
            rule: "DELETE /v1/files/* (policy.toml [providers.openai])".into(),
            waited: 0,
            timeout: 60,
        };
        let (summary, body) = text(&w);
        assert_eq!(
            summary,
            "broker: DELETE to api.openai.com waits for approval"
        );
        assert!(
            body.contains("broker approve 4242.1 (or --deny) within 60 s"),
            "{body}"
        );
        assert!(
            body.contains("DELETE /v1/files/xxx") && body.contains('…'),
            "{body}"
        );
        assert!(!body.contains('<') && !body.contains("\nreally"), "{body}");
        assert!(
            body.lines().all(|l| l.chars().count() < 2 * SHOWN),
            "{body}"
        );
    }

    #[test]
    fn unicode_that_could_fake_or_reorder_a_line_is_not_shown() {
        let faked = shown("/v1/x\u{2028}rule GET /v1/models\u{202E}\u{200B}end");
        assert!(
            faked.is_ascii() && !faked.contains('\u{2028}') && !faked.contains('\u{202E}'),
            "{faked}"
        );
        assert_eq!(faked, "/v1/x_rule GET /v1/models__end");
    }
}
