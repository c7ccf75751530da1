//! Handing a real key found in the agent's environment to `broker serve`.
//!
//! An agent started with a bare `LD_PRELOAD=libbroker.so` from a shell that sourced a `.env`
//! holds real keys. The constructor sends them over the daemon's control socket (format in
//! [`broker_contract::handover`]) and gets back the config of a new run of its own: those keys
//! are that run's credentials, never stored, and usable by this process tree only.
//!
//! This is the one place the constructor does blocking I/O beyond reading its config: a local
//! connect, one write and one read (the write and the read bounded by [`TIMEOUT`] each), and
//! only when a real key is present.
//! A daemon that does not answer in time costs the agent that delay once, then the keys stay
//! hidden (placeholder in the environment) but unused.
//!
//! The run lasts as long as the connection. Its descriptor is kept open *without*
//! `FD_CLOEXEC`, on purpose: `sh -c 'exec python agent.py'` replaces the process that opened
//! the run, and a close-on-exec descriptor would end the run right before the agent starts.
//! Children inherit it too, so the run ends when the last process of the tree holding it exits.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, IntoRawFd as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker_contract::handover::{Handover, HandoverReply};
use zeroize::Zeroize as _;

/// Longest the constructor waits on the daemon for the write and for the read. (A connect to a
/// Unix socket completes at once unless the listener's backlog is full.)
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Longest reply line accepted (a path).
const MAX_REPLY: usize = 4096;

/// Send `keys` (`(variable, value)`) to the daemon listening on `socket` and return the path of
/// the new run's shim config. On success the connection stays open for the life of the process
/// (and of children that inherit it). The error says why, without any key in it.
pub fn open_run(
    socket: &Path,
    keys: Vec<(String, String)>,
    receivers: &[Option<u32>],
) -> Result<PathBuf, String> {
    let mut request = Handover { keys };
    let mut text = request.render();
    for (_, value) in &mut request.keys {
        value.zeroize();
    }
    let result = exchange(socket, &text, receivers);
    text.zeroize();
    let (stream, reply) = result?;
    match HandoverReply::parse(&reply) {
        Some(HandoverReply::Ok(path)) => {
            keep_across_exec(&stream)?;
            // Deliberately never closed: the run lives while this descriptor is open.
            let _ = stream.into_raw_fd();
            Ok(path)
        }
        Some(HandoverReply::Refused(why)) => Err(format!("broker serve refused: {why}")),
        None => Err("broker serve answered something unreadable".into()),
    }
}

fn exchange(
    socket: &Path,
    request: &str,
    receivers: &[Option<u32>],
) -> Result<(UnixStream, String), String> {
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", socket.display());
    // A connect to a Unix socket whose listener's backlog is full would wait; the daemon
    // accepts in a loop, so this only happens to a daemon that is stuck, which the read
    // timeout below then catches.
    let mut stream = UnixStream::connect(socket).map_err(|e| io("cannot connect to", e))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| io("cannot set a timeout on", e))?;
    // The keys go only to a daemon of this user (or root), or to the system broker's user:
    // never to a socket someone else planted where we looked.
    match peer_uid(&stream) {
        Some(uid) if receivers.contains(&Some(uid)) => {}
        Some(_) => return Err(format!("{} belongs to another user", socket.display())),
        None => return Err(format!("cannot tell who listens on {}", socket.display())),
    }
    stream
        .write_all(request.as_bytes())
        .map_err(|e| io("cannot write to", e))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while !reply.ends_with(b"\n") && reply.len() < MAX_REPLY {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("no answer from", e)),
        }
    }
    let reply = String::from_utf8(reply).map_err(|_| "broker serve answered non-UTF-8")?;
    Ok((stream, reply))
}

/// The uid of the process at the other end (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is an open socket owned by `stream`; `cred` and `len` are valid
    // for writes of the sizes given, as SO_PEERCRED requires.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// Clear `FD_CLOEXEC` (std opens every descriptor close-on-exec); see the module docs for why.
fn keep_across_exec(stream: &UnixStream) -> Result<(), String> {
    let fd = stream.as_raw_fd();
    // SAFETY: fcntl on a descriptor owned by `stream`, with commands that take an int.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == 0
    };
    ok.then_some(())
        .ok_or_else(|| "cannot keep the run's connection open across exec".to_string())
}
