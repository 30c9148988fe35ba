//! trireme-core: every decision trireme makes, as pure state machines.
//!
//! No sockets, files, clocks, threads or global RNG (enforced by `core/clippy.toml`):
//! bytes and events come in with `now`, output is pulled. See [`proxy::Session`] for the
//! driving contract and [`sim`] for the deterministic simulator that exercises it.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod admission;
pub mod background;
pub mod balance;
pub mod buf;
pub mod cache;
pub mod config;
pub mod driver;
pub mod error;
pub mod forward;
pub mod http1;
pub mod metrics;
pub mod proxy;
pub mod respond;
pub mod route;
pub mod shutdown;
pub mod sim;
pub mod static_files;
pub mod tls;
pub mod transport;
pub mod upstream;
pub mod wake;

pub use error::{HttpError, Status};
pub use proxy::{Action, ProxyContext, Session};

/// Test support: an origin for virtual time. The only clock read in core, and only in tests:
/// everything after it is `origin + duration`.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_origin() -> std::time::Instant {
    std::time::Instant::now()
}

/// Test support: a fixed wall-clock origin (HTTP dates in tests are relative to it).
#[cfg(test)]
pub(crate) fn test_wall() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
}

/// Test support: the proxy context a YAML config builds (backends resolved literally).
#[cfg(test)]
pub(crate) fn test_ctx(yaml: &str, now: std::time::Instant) -> std::sync::Arc<proxy::ProxyContext> {
    config::Config::from_yaml(yaml, "test.yaml")
        .expect("config")
        .build(now, test_wall(), &config::resolve_literal)
        .expect("build")
}
