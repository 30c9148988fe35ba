//! trireme on mio (epoll), thread per core. Not built yet: the runtimes issue adds it on the
//! same `trireme_core::proxy::Session` contract that `trireme-tokio` drives.
pub use trireme_core as core;
