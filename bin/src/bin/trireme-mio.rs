//! trireme on mio (epoll), thread per core.
fn main() {
    std::process::exit(trireme::cli::main(&trireme::runtimes::MIO));
}
