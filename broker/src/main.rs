/// mimalloc, not glibc malloc: each proxied request allocates and frees many small buffers
/// (TLS records, headers, body chunks), and glibc's free-list upkeep was a seventh of the
/// broker's CPU per request in the keep-alive benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    broker_cli::cli::main()
}
