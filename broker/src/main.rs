fn main() -> std::process::ExitCode {
    broker::cli::main()
}
