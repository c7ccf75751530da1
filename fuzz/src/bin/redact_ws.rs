//! AFL++ entry point: `scripts/fuzz redact_ws`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::redact_ws(data));
}
