fn main() -> std::process::ExitCode {
    healthd::cli::main()
}
