//! AFL++ entry point: `scripts/fuzz dns_message`.
fn main() {
    afl::fuzz!(|data: &[u8]| broker_fuzz::dns_message(data));
}
