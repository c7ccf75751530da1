//! AFL++ entry point: `scripts/fuzz audit_log`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::audit_log(data));
}
