//! AFL++ entry point: `scripts/fuzz swap`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::swap(data));
}
