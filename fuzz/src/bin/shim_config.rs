//! AFL++ entry point: `scripts/fuzz shim_config`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::shim_config(data));
}
