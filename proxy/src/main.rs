#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    outrigger::cli::main()
}
