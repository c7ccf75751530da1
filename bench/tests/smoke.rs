//! The benchmark runs end to end on this machine (debug build, short windows): every section
//! produces its rows, with a figure for each leg it compares, and none fails. It checks that the
//! program works and measures the real broker; it says nothing about speed (figures from a
//! debug build on a shared CI machine mean little, so none is compared with a target).

use std::process::{Command, Stdio};

use serde_json::Value;

/// Every section but two: the 20 ms round-trip one (its 200 curl runs would add half a minute)
/// and `connect`, which runs the shim's own benchmark (`shim/examples/bench.rs`, fixed counts
/// that take minutes unoptimized; the shim's tests cover the hook itself).
const SECTIONS: &str = "keepalive,newconn,sse,run,rss";

/// Run the bench built for the tests (one round of 0.2 s per leg) with `args`; its JSON report
/// its stdout and its stderr. Fails the test if it fails.
fn run_short(args: &[&str]) -> (Value, String, String) {
    // The tests run at once: a report file each.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!(
        "broker-bench-smoke-{}-{run}.json",
        std::process::id()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--no-build", "--rounds", "1", "--secs", "0.2"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .expect("run the bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "bench {args:?} failed:\n{stdout}\n{stderr}"
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    let _ = std::fs::remove_file(&json);
    (report, stdout, stderr)
}

#[test]
fn every_section_runs_and_reports_each_leg() {
    let (report, _, stderr) = run_short(&["--only", SECTIONS]);
    assert!(report["pinned"].is_null(), "not pinned unless asked");

    let notes: Vec<&str> = report["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !notes.iter().any(|n| n.contains("failed")),
        "a section failed: {notes:#?}\n{stderr}"
    );

    let rows = report["rows"].as_array().expect("rows");
    let figure = |row: &Value, leg: &str| row[leg].as_f64().filter(|v| v.is_finite() && *v > 0.0);
    for row in rows {
        let leg = row["leg"].as_str().expect("leg");
        // The user/kernel split is counted in clock ticks (10 ms): in a 0.2 s window one side
        // may get none at all, so 0 is a figure there.
        if leg.trim_start().starts_with("of which") {
            assert!(
                row["broker"]
                    .as_f64()
                    .is_some_and(|v| v.is_finite() && v >= 0.0),
                "no split of the broker's CPU time: {row}"
            );
            continue;
        }
        assert!(
            ["direct", "broker", "shim"]
                .iter()
                .any(|side| figure(row, side).is_some()),
            "row without a figure: {row}"
        );
        // A throughput row compares the broker (or the shim) with going direct.
        if row["unit"] == "req/s" || row["unit"] == "conn/s" {
            assert!(figure(row, "direct").is_some(), "{leg}: no direct figure");
            assert!(
                figure(row, "broker").or(figure(row, "shim")).is_some(),
                "{leg}: no brokered figure"
            );
        }
    }
    let legs: Vec<&str> = rows.iter().filter_map(|r| r["leg"].as_str()).collect();
    // The shim legs run where their load generator is installed (CI installs both).
    for (tool, leg) in [
        ("wrk", "keep-alive h1, 1 conn, wrk"),
        ("h2load", "keep-alive h2, 8 conns, h2load"),
    ] {
        if broker_integration::which(tool).is_some() {
            assert!(legs.contains(&leg), "no shim row {leg:?}: {legs:#?}");
        }
    }
    // nginx doing the same job is measured beside the broker wherever it is installed (CI
    // does not install it: the bench is not a test): every throughput row then has its figure.
    if broker_bench::nginx::find().is_some() {
        for row in rows
            .iter()
            .filter(|r| r["unit"] == "req/s" || r["unit"] == "conn/s")
        {
            assert!(figure(row, "nginx").is_some(), "no nginx figure: {row}");
            // And the spread of single rounds, lowest first.
            let spread: Vec<f64> = row["broker_over_nginx_rounds"]
                .as_array()
                .unwrap_or_else(|| panic!("no spread of rounds: {row}"))
                .iter()
                .filter_map(|v| v.as_f64())
                .collect();
            assert!(
                matches!(spread[..], [lo, hi] if lo > 0.0 && lo <= hi && hi.is_finite()),
                "bad spread of rounds: {row}"
            );
        }
    }
    for expected in [
        "keep-alive h1, 1 conn",
        "keep-alive h1, 8 conns",
        "keep-alive h2, 1 conn",
        "keep-alive h2, 8 conns",
        "CPU per request h1, 1 conn: broker serve",
        "new TLS connections",
        "SSE",
        "broker run",
        "RSS",
    ] {
        assert!(
            legs.iter().any(|l| l.contains(expected)),
            "no row for {expected:?}: {legs:#?}"
        );
    }
}

/// `--pin`: the load on one core, the origin and the proxies on another, and the report says so.
#[test]
fn pinned_run_reports_the_keep_alive_rows() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        // --pin refuses one core, by design; that refusal is what there is to check here.
        let out = Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(["--no-build", "--pin", "--only", "keepalive"])
            .stdin(Stdio::null())
            .output()
            .expect("run the bench");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--pin needs two cores"));
        return;
    }
    let (report, stdout, _) = run_short(&["--pin", "--no-nginx", "--only", "keepalive"]);
    let core = |side: &str| report["pinned"][side].as_u64();
    assert!(
        matches!((core("load"), core("proxy")), (Some(l), Some(p)) if l != p),
        "two different cores: {}",
        report["pinned"]
    );
    assert!(stdout.contains("note: pinned (--pin)"), "{stdout}");
    let legs: Vec<&str> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["leg"].as_str())
        .collect();
    assert!(legs.contains(&"keep-alive h1, 8 conns"), "{legs:#?}");
}
