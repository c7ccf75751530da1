//! Limits that keep one stalled, broken or hostile client from holding the broker down:
//! timeouts on every phase a client could stretch, HTTP/2 settings, and caps on open
//! connections, per run and for the whole broker, with a refusal the agent can read.
//!
//! Why caps per run as well as in all: the broker serves every run of the user from one
//! process, and its descriptors are one budget. Without a per-run cap, one agent that opens
//! connections and never uses them (about 950 at the usual `ulimit -n 1024`) made the broker
//! reset every new connection, for every run. A run may hold a share of the global cap, so
//! a flood from one run leaves room for the others.
//!
//! On a system broker, the run that bare preloads use is shared by every allowed uid; there a
//! share is per uid instead (each uid counted as a run of its own would be), so one uid's
//! agent cannot take the room the other uids' agents need. The uid is known once the
//! connection's owner is looked up (`listen::check_peer`): until then, and for a connection
//! over its uid's share (refused at once), it counts only against the global cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// From accept to a finished TLS handshake, the run ticket included: one deadline for the
/// whole phase, so a client cannot stretch it by sending each part just in time. A shimmed
/// agent sends its ticket and ClientHello in one segment over loopback; 15 s is a client that
/// is stopped or hostile, not a slow one.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// From the end of the TLS handshake (and, on HTTP/1.1, from the end of the previous response)
/// to a complete request head. A head crosses loopback in one write; what takes longer is an
/// agent that opened a connection it does not use, or a slowloris. On HTTP/1.1 this is also
/// the keep-alive idle limit: hyper's head timer starts as soon as it waits for the next head
/// (hyper 1.12 `proto/h1/conn.rs`, `poll_read_head`). 30 s is hyper's own default, and far
/// above the idle expiry of the HTTP/1.1 pools agents use (undici 4 s, httpx 5 s; urllib3
/// checks a pooled connection before reusing it and reconnects if the server closed it).
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP/2 connection with no open stream is closed (GOAWAY) after this long, checked once a
/// period (so between one and two periods). HTTP/2 clients (Node's `http2`, httpx, Go) keep
/// one connection per host for all their requests and may wait between bursts; 90 s is Go's
/// `IdleConnTimeout`, so a client with that default closes first.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a closing connection may take to say goodbye (HTTP/2 GOAWAY) before it is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Most HTTP/2 streams one agent connection may have open. RFC 9113 asks for at least 100 so
/// as not to limit parallelism; an agent's concurrent API calls stay far below it, and each
/// open stream may hold an upstream connection (two descriptors).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Largest request header list (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`), decoded. API
/// requests carry a few hundred bytes of headers; hyper's default is 16 KiB, and 64 KiB leaves
/// room for large cookies or tracing headers. It also bounds the CONTINUATION flood: h2
/// 0.4.20 refuses a header block in more than `max_header_list_size / max_frame_size * 1.25`
/// frames, at least 5 (`codec/framed_read.rs`, "Check for CONTINUATION flood"), here 5.
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Rapid reset (CVE-2023-44487): streams the client opened and reset before the broker
/// accepted them, pending at once, before the connection is closed with
/// `ENHANCE_YOUR_CALM`. h2's default (`proto::DEFAULT_REMOTE_RESET_STREAM_MAX`); hyper leaves
/// it unset, so it is set here explicitly.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the broker had to reset because the client broke the protocol on them, before the
/// connection is closed (h2's defence against resets provoked by malformed frames). hyper's
/// default, set explicitly so a change of default does not silently remove it.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The most client connections the broker holds, whatever the descriptor limit allows. Each
/// costs about 46 KiB (README, Performance: 46.5 MiB with 1,000 open), so 4,096 is about
/// 190 MiB: beyond that an agent is leaking connections, not using them.
pub const MAX_CONNECTIONS: usize = 4096;

/// Descriptors kept for everything but client connections: the broker's own (the vault,
/// the audit log, inotify, the control socket, the runtime's), and each run's: its fake
/// address, `[::1]` and CONNECT listeners, its DNS responder's UDP and TCP sockets, and a
/// joined run's control connection, the same whatever the catalog's size. `scripts/run-cost`
/// counts 24 for `broker serve` with its own run open and 6 more per joined run (22 for an
/// embedded `broker run`); with one listener per host pattern it was 267 and 249 more per
/// run, past this reserve. 256 leaves room for about 35 runs at once (held by
/// `tests/tests/resilience.rs::joined_runs_cost_few_descriptors_and_fit_the_reserve`). A DNS
/// responder's forwards in flight (up to 256 a run, for a moment each) are not counted here:
/// `broker serve` raises its limit to the hard one, where the caps stop at
/// [`MAX_CONNECTIONS`] long before the reserve matters; an embedded `broker run` keeps the
/// soft limit its agent inherits.
pub const FD_RESERVE: usize = 256;

/// A client connection may hold two descriptors: its own and the upstream connection it is
/// using.
const FDS_PER_CONNECTION: usize = 2;

/// A run may hold this fraction (1/N) of the global cap, so that even three runs flooding at
/// once leave a quarter of it to the others.
const RUN_SHARE: usize = 4;

/// Refusals being told at once (a TLS handshake and a 503). Past this a connection over the
/// cap is closed without a word: telling costs a descriptor for up to [`REFUSAL_TIMEOUT`], and
/// a flood must not turn the telling into the hold.
const REFUSING_AT_ONCE: usize = 16;

/// How long telling one refusal may take.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// A burst of refusals is audited once: its first refusal, and again only after this long
/// without one. A flood of thousands of connections is one line, not thousands.
const BURST_QUIET: Duration = Duration::from_secs(10);

/// The limits of one broker. [`Limits::default`] is the constants above, with the connection
/// caps fitted to the process's descriptor limit; tests shorten the timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub request_head_timeout: Duration,
    pub idle_timeout: Duration,
    /// Client connections open at once, in all.
    pub max_connections: usize,
    /// Client connections open at once, per run.
    pub max_run_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::for_descriptors(descriptor_limit())
    }
}

impl Limits {
    /// The default limits for a process that may open `nofile` descriptors.
    pub fn for_descriptors(nofile: usize) -> Limits {
        let max_connections = (nofile.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION)
            .clamp(RUN_SHARE, MAX_CONNECTIONS);
        Limits {
            request_head_timeout: REQUEST_HEAD_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections,
            max_run_connections: max_connections / RUN_SHARE,
        }
    }
}

/// The soft `RLIMIT_NOFILE` (1024 when unknown or unlimited beyond reason).
fn descriptor_limit() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit
        .current
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1024)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit: the default soft limit (1024) is kept
/// low for programs that use `select` (which cannot take a descriptor above 1023), and the
/// broker does not use it. Returns the new soft limit. For `broker serve` only: a process
/// that starts an agent would hand the raised limit down to it.
pub fn raise_descriptor_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if raised.current != limit.current {
        setrlimit(Resource::Nofile, raised)?;
    }
    Ok(limit.maximum.unwrap_or(u64::MAX))
}

/// Open connections against a cap, and when the last refusal was audited.
#[derive(Debug)]
pub(super) struct Gauge {
    open: AtomicUsize,
    cap: usize,
    last_audited: Mutex<Option<Instant>>,
}

impl Gauge {
    pub(super) fn new(cap: usize) -> Arc<Gauge> {
        Arc::new(Gauge {
            open: AtomicUsize::new(0),
            cap,
            last_audited: Mutex::new(None),
        })
    }

    fn take(&self) -> bool {
        if self.open.fetch_add(1, Ordering::Relaxed) < self.cap {
            return true;
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
        false
    }

    fn give(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether this refusal starts a burst (and so is audited).
    fn starts_burst(&self, now: Instant) -> bool {
        let mut last = self.last_audited.lock().unwrap_or_else(|p| p.into_inner());
        let quiet = last.is_none_or(|at| now.duration_since(at) >= BURST_QUIET);
        if quiet {
            *last = Some(now);
        }
        quiet
    }
}

/// A client connection's place under the caps, given back when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    run: Arc<Gauge>,
    global: Arc<Gauge>,
    /// Its uid's share, in a run several uids share (see [`Caps::admit_uid`]).
    uid: Option<Arc<Gauge>>,
}

impl Slot {
    /// Count the connection against its uid's share too (taken by [`Caps::admit_uid`]).
    pub(super) fn count_uid(&mut self, mut share: UidShare) {
        self.uid = share.0.take();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.run.give();
        self.global.give();
        if let Some(uid) = &self.uid {
            uid.give();
        }
    }
}

/// A place in one uid's share, given back when dropped (unless moved into a [`Slot`]).
#[derive(Debug)]
pub(super) struct UidShare(Option<Arc<Gauge>>);

impl Drop for UidShare {
    fn drop(&mut self) {
        if let Some(gauge) = self.0.take() {
            gauge.give();
        }
    }
}

/// Which cap a refused connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Run,
    /// This uid's share of a run that several uids share.
    Uid(u32),
    Global,
}

/// Which cap a refused connection hit, and whether to audit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full {
    pub scope: Scope,
    pub cap: usize,
    pub audit: bool,
}

impl Full {
    /// What the agent and the audit are told: what happened and what to do.
    pub(super) fn message(&self) -> String {
        match self.scope {
            Scope::Run => format!(
                "this run has {} connections open to the broker, the most one run may hold: close idle connections (or lower the client's pool size) and retry",
                self.cap
            ),
            Scope::Uid(uid) => format!(
                "uid {uid} has {} connections open to the system broker, the most one uid may hold: close idle connections (or lower the client's pool size) and retry",
                self.cap
            ),
            Scope::Global => format!(
                "the broker holds {} client connections, the most it serves at once: retry later, or raise `ulimit -n` for broker serve",
                self.cap
            ),
        }
    }
}

/// The caps of one broker: the global gauge, and the permits for telling refusals.
#[derive(Debug)]
pub(super) struct Caps {
    pub limits: Limits,
    global: Arc<Gauge>,
    refusing: Arc<Semaphore>,
    /// Each uid's share of the runs several uids share. One entry per uid ever admitted:
    /// only uids on the system broker's allow list get this far, so it stays small.
    uids: Mutex<HashMap<u32, Arc<Gauge>>>,
}

impl Caps {
    pub(super) fn new(limits: Limits) -> Caps {
        Caps {
            global: Gauge::new(limits.max_connections),
            refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
            uids: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// A gauge for a new run's connections.
    pub(super) fn run_gauge(&self) -> Arc<Gauge> {
        Gauge::new(self.limits.max_run_connections)
    }

    /// A gauge for a run several uids share (a system broker's bare-preload run): no cap of
    /// its own beyond the global one, since each uid's connections count against the uid's
    /// own share ([`Caps::admit_uid`]), as large as a run's.
    pub(super) fn shared_run_gauge(&self) -> Arc<Gauge> {
        Gauge::new(self.limits.max_connections)
    }

    /// A place in `uid`'s share of the shared runs, or the refusal if it is full.
    pub(super) fn admit_uid(&self, uid: u32) -> Result<UidShare, Full> {
        let gauge = self
            .uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid)
            .or_insert_with(|| Gauge::new(self.limits.max_run_connections))
            .clone();
        if !gauge.take() {
            return Err(Full {
                scope: Scope::Uid(uid),
                cap: gauge.cap,
                audit: gauge.starts_burst(Instant::now()),
            });
        }
        Ok(UidShare(Some(gauge)))
    }

    /// A slot for a new connection of the run `run` counts, or which cap is full.
    pub(super) fn admit(&self, run: &Arc<Gauge>) -> Result<Slot, Full> {
        if !run.take() {
            return Err(Full {
                scope: Scope::Run,
                cap: run.cap,
                audit: run.starts_burst(Instant::now()),
            });
        }
        if !self.global.take() {
            run.give();
            return Err(Full {
                scope: Scope::Global,
                cap: self.global.cap,
                audit: self.global.starts_burst(Instant::now()),
            });
        }
        Ok(Slot {
            run: run.clone(),
            global: self.global.clone(),
            uid: None,
        })
    }

    /// A permit to tell a refused connection why, if not too many are being told.
    pub(super) fn refusal_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.refusing.clone().try_acquire_owned().ok()
    }
}

/// What an HTTP/2 connection is doing, for its idle timeout: requests started and finished.
/// (HTTP/1.1 connections are timed by hyper's head timer, see [`REQUEST_HEAD_TIMEOUT`].)
#[derive(Debug, Default)]
pub(super) struct Activity {
    started: AtomicU64,
    ended: AtomicU64,
    http1: std::sync::atomic::AtomicBool,
}

/// One request of a connection, open until dropped (with the response body it rides in).
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// A request began: for HTTP/2 the returned guard must live as long as its response.
    pub(super) fn begin(self: &Arc<Self>, version: http::Version) -> Option<InFlight> {
        self.started.fetch_add(1, Ordering::Relaxed);
        if version == http::Version::HTTP_2 {
            Some(InFlight(self.clone()))
        } else {
            self.http1.store(true, Ordering::Relaxed);
            None
        }
    }

    /// Resolves when the connection should be closed: no request began within the head
    /// timeout after TLS, or (HTTP/2) no stream was open and none began or ended for a whole
    /// idle period. HTTP/1.1 connections are left to hyper's head timer once they began.
    pub(super) async fn expired(&self, limits: &Limits) {
        tokio::time::sleep(limits.request_head_timeout).await;
        let (mut started, mut ended) = self.counts();
        if started == 0 {
            return;
        }
        loop {
            if self.http1.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            tokio::time::sleep(limits.idle_timeout).await;
            let now = self.counts();
            if now == (started, ended) && started == ended {
                return;
            }
            (started, ended) = now;
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.ended.load(Ordering::Relaxed),
        )
    }
}

/// Serve `conn` until it ends or `activity` says it expired; then shut it down gracefully
/// (HTTP/2 GOAWAY), for at most [`SHUTDOWN_GRACE`].
pub(super) async fn serve_until_idle<C, T, E>(
    conn: C,
    activity: &Activity,
    limits: &Limits,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Option<Result<T, E>>
where
    C: std::future::Future<Output = Result<T, E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => Some(result),
        () = activity.expired(limits) => {
            shutdown(conn.as_mut());
            tokio::time::timeout(SHUTDOWN_GRACE, conn).await.ok()
        }
    }
}

/// A response body that keeps its request counted as open until it is done or dropped.
pub(super) struct Tracked {
    pub inner: super::ProxyBody,
    pub _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, super::BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_descriptor_limit() {
        let low = Limits::for_descriptors(512);
        assert_eq!(low.max_connections, (512 - FD_RESERVE) / 2);
        assert_eq!(low.max_run_connections, low.max_connections / 4);
        assert_eq!(
            Limits::for_descriptors(1 << 20).max_connections,
            MAX_CONNECTIONS
        );
        assert!(Limits::for_descriptors(10).max_run_connections >= 1);
    }

    #[test]
    fn a_full_run_leaves_room_for_others_and_bursts_are_audited_once() {
        let caps = Caps::new(Limits {
            max_connections: 8,
            max_run_connections: 2,
            ..Limits::for_descriptors(1024)
        });
        let (flooder, other) = (caps.run_gauge(), caps.run_gauge());
        let held: Vec<Slot> = (0..2)
            .map(|_| caps.admit(&flooder).expect("slot"))
            .collect();
        let first = caps.admit(&flooder).expect_err("over the run's cap");
        assert!(first.scope == Scope::Run && first.audit);
        let second = caps.admit(&flooder).expect_err("still over");
        assert!(!second.audit, "one audit line per burst");
        let served = caps.admit(&other).expect("another run still gets in");
        drop(held);
        let again = caps
            .admit(&flooder)
            .expect("slots come back when connections close");
        drop((served, again));
        assert_eq!(caps.global.open.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn each_uid_of_a_shared_run_has_its_own_share() {
        let caps = Caps::new(Limits::for_descriptors(512 + 256));
        let share = caps.limits.max_run_connections;
        let shared = caps.shared_run_gauge();
        let mut held = Vec::new();
        for _ in 0..share {
            let mut slot = caps.admit(&shared).expect("room in the run");
            slot.count_uid(caps.admit_uid(1001).expect("room in the share"));
            held.push(slot);
        }
        // uid 1001 is full: told so, audited once per burst; its connection is not counted.
        let full = caps.admit_uid(1001).expect_err("full");
        assert_eq!(
            (full.scope, full.cap, full.audit),
            (Scope::Uid(1001), share, true)
        );
        assert!(full.message().contains("uid 1001"), "{}", full.message());
        assert!(!caps.admit_uid(1001).expect_err("full").audit);
        // Another uid of the same run is served: the run has no cap of its own below global.
        let mut other = caps.admit(&shared).expect("room in the run");
        other.count_uid(caps.admit_uid(1002).expect("its own share"));
        // A connection given back frees its uid's place.
        held.pop();
        drop(caps.admit_uid(1001).expect("room again"));
        assert!(
            caps.admit_uid(1001).is_ok(),
            "a share dropped unused is given back"
        );
    }

    #[test]
    fn the_global_cap_holds_across_runs() {
        let caps = Caps::new(Limits {
            max_connections: 3,
            max_run_connections: 2,
            ..Limits::for_descriptors(1024)
        });
        let (a, b) = (caps.run_gauge(), caps.run_gauge());
        let _held = [
            caps.admit(&a).expect("a1"),
            caps.admit(&a).expect("a2"),
            caps.admit(&b).expect("b1"),
        ];
        let full = caps.admit(&b).expect_err("global cap");
        assert!(full.scope == Scope::Global && full.message().contains("ulimit -n"));
        assert_eq!(
            b.open.load(Ordering::Relaxed),
            1,
            "the run's count is given back"
        );
    }

    fn short() -> Limits {
        Limits {
            request_head_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(100),
            ..Limits::for_descriptors(1024)
        }
    }

    #[tokio::test]
    async fn an_idle_http2_connection_expires_and_a_busy_one_does_not() {
        let limits = short();
        // Nothing after TLS: expires (the bound is generous: a loaded machine is slow).
        let silent = Arc::new(Activity::default());
        tokio::time::timeout(Duration::from_secs(30), silent.expired(&limits))
            .await
            .expect("a silent connection expires");

        // A stream open for many idle periods keeps it; once done, it expires.
        let busy = Arc::new(Activity::default());
        let guard = busy.begin(http::Version::HTTP_2);
        let watch = {
            let busy = busy.clone();
            let limits = limits.clone();
            tokio::spawn(async move { busy.expired(&limits).await })
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!watch.is_finished(), "an open stream is not idle");
        drop(guard);
        tokio::time::timeout(Duration::from_secs(30), watch)
            .await
            .expect("an idle connection expires")
            .expect("watch");
    }

    #[tokio::test]
    async fn http1_connections_are_left_to_hypers_head_timer() {
        let limits = short();
        let activity = Arc::new(Activity::default());
        assert!(activity.begin(http::Version::HTTP_11).is_none());
        let expired = tokio::time::timeout(Duration::from_millis(1000), activity.expired(&limits));
        assert!(expired.await.is_err());
    }
}
