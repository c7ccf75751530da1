//! The soak program runs end to end for a few seconds (debug build) and passes: the broker
//! stays up, its descriptors come back after the load, and the key reaches no client and no
//! file of the broker's, while every kind of client and every fault of the origin was
//! exercised. The same verdicts as the long run (`scripts/soak`), on a short window.

use std::process::{Command, Stdio};

use serde_json::Value;

#[test]
fn a_short_soak_passes_and_exercises_every_client_and_fault() {
    let json = std::env::temp_dir().join(format!("broker-soak-smoke-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(["--secs", "8", "--report-every", "2", "--settle", "10"])
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .expect("run the soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Option<Value> = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let _ = std::fs::remove_file(&json);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let report = report.expect("the JSON summary");
    assert_eq!(report["failures"], Value::Array(vec![]), "{stdout}");
    assert_eq!(report["origin_refused"], 0, "{stdout}");

    let keys = |field: &str| -> Vec<String> {
        report[field]
            .as_object()
            .unwrap_or_else(|| panic!("{field} in the report"))
            .iter()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(k, _)| k.clone())
            .collect()
    };
    let ok = keys("ok");
    for kind in ["models", "echo", "sse stream", "ws session"] {
        assert!(
            ok.iter().any(|k| k.ends_with(kind)),
            "no {kind:?} answered: {ok:?}\n{stdout}"
        );
    }
    for proto in ["h1 ", "h2 "] {
        assert!(
            ok.iter().any(|k| k.starts_with(proto)),
            "nothing over {proto}: {ok:?}\n{stdout}"
        );
    }
    let faults = keys("faults");
    for fault in ["reset", "short", "garbage", "stall"] {
        assert!(
            faults.iter().any(|k| k.starts_with(&format!("{fault}:"))),
            "the origin's {fault:?} fault never came up: {faults:?}\n{stdout}"
        );
    }
    assert!(
        report["slowloris_opened"].as_u64().unwrap_or(0) > 0,
        "no slowloris connection: {stdout}"
    );
    assert!(
        report["files_scanned"].as_u64().unwrap_or(0) > 0,
        "BROKER_HOME was not scanned for the key: {stdout}"
    );
}
