//! AFL++ entry point: `scripts/fuzz provider_toml`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::provider_toml(data));
}
