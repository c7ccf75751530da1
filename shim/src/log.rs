//! One-line messages on stderr, written with a single `write(2)` so they never take a lock
//! (`eprintln!` takes std's stderr mutex, which a `fork` could strand) and never interleave.
//! Never used for anything that could hold a secret.

/// Write `broker: <msg>\n` to fd 2, best effort.
pub fn line(msg: &str) {
    let text = format!("broker: {msg}\n");
    // SAFETY: writes `text.len()` initialised bytes from a live buffer; fd 2 may be closed, in
    // which case write fails harmlessly.
    let _ = unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

/// Record a connection refused under `deny_unlisted` in the run's denial log (the broker moves
/// it into the audit log). One `write(2)` of one short line with `O_APPEND`, so lines from
/// concurrent processes never interleave; best effort, never blocking on anything but the
/// local file.
pub fn denial(cfg: &broker_contract::ShimConfig, dest: Option<std::net::SocketAddr>) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let Some(path) = cfg.denial_log.as_ref() else {
        return;
    };
    let dest = dest.map_or_else(|| "?".to_string(), |d| d.to_string());
    let line = format!("{} {dest}\n", std::process::id());
    let file = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path);
    if let Ok(mut file) = file {
        let _ = file.write_all(line.as_bytes());
    }
}
