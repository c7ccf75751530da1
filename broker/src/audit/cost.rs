//! What the audit writer's work costs per line, in CPU time (an ignored test that prints
//! figures: `scripts/bench-audit`). The writer appends one line per proxied request, on a core
//! the proxy shares, so its cost per line is part of the broker's cost per request (README,
//! "Seventh round"). CPU time, not instructions: the HMAC runs on the CPU's SHA extensions,
//! which valgrind does not have.
use super::*;

/// Lines per append: about what the writer gathers in 5 ms at 35,000 requests a second.
const BATCH: usize = 175;
const BATCHES: usize = 2000;

/// This thread's CPU time so far, in nanoseconds (`/proc/thread-self/schedstat`), and its
/// user and kernel clock ticks (fields 14 and 15 of `/proc/thread-self/stat`).
fn cpu() -> (u64, u64, u64) {
    let schedstat = fs::read_to_string("/proc/thread-self/schedstat")
        .unwrap_or_else(|e| panic!("/proc/thread-self/schedstat: {e}"));
    let on_cpu = schedstat.split_whitespace().next().unwrap_or("");
    let on_cpu = on_cpu
        .parse::<u64>()
        .unwrap_or_else(|e| panic!("schedstat: {on_cpu:?}: {e}"));
    let [user, sys] = crate::procfs::stat_fields("thread-self", [14, 15])
        .unwrap_or_else(|| panic!("/proc/thread-self/stat: no user and system times"));
    (on_cpu, user, sys)
}

/// Nanoseconds per line of CPU time spent by `work`, split into user and kernel time in the
/// proportion of the clock ticks.
fn per_line(lines: usize, work: impl FnOnce()) -> (f64, f64) {
    let (ns0, user0, sys0) = cpu();
    work();
    let (ns1, user1, sys1) = cpu();
    let total = (ns1 - ns0) as f64 / lines as f64;
    let (user, sys) = ((user1 - user0) as f64, (sys1 - sys0) as f64);
    let user_share = if user + sys > 0.0 {
        user / (user + sys)
    } else {
        1.0
    };
    (total * user_share, total * (1.0 - user_share))
}

/// The event of a proxied request as the bench's agent makes it (a command line with quotes).
fn request_event() -> AuditEvent {
    AuditEvent {
        run_id: Some("run-Qx7bT2".into()),
        pid: Some(27755),
        command: Some(
            "sh -c exec h2load --h1 -t1 -c 8 -m1 -n 2000 -H \"authorization: Bearer $OPENAI_API_KEY\" https://api.openai.com/v1/models".into(),
        ),
        provider: Some("openai".into()),
        profile: Some("default".into()),
        host: Some("api.openai.com".into()),
        sni: Some("api.openai.com".into()),
        method: Some("GET".into()),
        path: Some("/v1/models".into()),
        status: Some(200),
        bytes: Some(81),
        latency_ms: Some(0),
        ..AuditEvent::new(EventKind::CredentialUse)
    }
}

#[test]
#[ignore = "prints figures; run by scripts/bench-audit"]
fn cost_per_line() {
    let (_dir, home, vault) = crate::vault::test_vault();
    let audit = Audit::open(&home, &vault).unwrap_or_else(|e| panic!("open: {e}"));
    let batches: Vec<Vec<AuditEvent>> = (0..BATCHES)
        .map(|_| (0..BATCH).map(|_| request_event()).collect())
        .collect();
    let lines = BATCH * BATCHES;
    // As the proxy's writer appends: settled every fourth batch (20 ms of 5 ms batches).
    let (user, kernel) = per_line(lines, || {
        for (i, batch) in batches.into_iter().enumerate() {
            let settle = if i % 4 == 3 {
                Settle::Now
            } else {
                Settle::Later
            };
            if let Err(failed) = audit.try_append(batch, settle) {
                panic!("append: {}", failed.error);
            }
        }
    });
    println!("append, {BATCH} lines a batch, settled every 4th: {user:.0} ns user + {kernel:.0} ns kernel per line");

    let event = request_event();
    let view = event.view();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
    let prev = Mac::from_hex(GENESIS);
    let time = now_rfc3339();
    let mut out = Vec::with_capacity(BATCH * 640);
    let (json, _) = per_line(lines, || {
        for _ in 0..BATCHES {
            out.clear();
            for seq in 0..BATCH as u64 {
                line::write_open_line(seq, &time, &view, prev.as_bytes(), &mut out);
            }
        }
    });
    let one = out.len() / BATCH;
    println!("of which the JSON: {json:.0} ns per line ({one} bytes)");
    let (mac, _) = per_line(lines, || {
        for _ in 0..lines {
            std::hint::black_box(hmac::sign(&key, std::hint::black_box(&out[..one])));
        }
    });
    println!("of which the HMAC-SHA256: {mac:.0} ns per line");
}
