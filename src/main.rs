//! The `ingestd` binary: the command line of the `ingestd` library.

fn main() -> std::process::ExitCode {
    ingestd::cli::main()
}
