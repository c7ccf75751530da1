//! AFL++ entry point: `scripts/fuzz control_request`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::control_request(data));
}
