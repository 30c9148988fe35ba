//! trireme on tokio.
fn main() {
    std::process::exit(trireme::cli::main(&trireme::runtimes::TOKIO));
}
