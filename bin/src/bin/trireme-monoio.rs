//! trireme on monoio (io_uring; epoll fallback), thread per core.
fn main() {
    std::process::exit(trireme::cli::main(&trireme::runtimes::MONOIO));
}
