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
