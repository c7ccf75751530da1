//! AFL++ entry point: `scripts/fuzz redact_stream`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::redact_stream(data));
}
