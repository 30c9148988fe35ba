//! The event models a binary can run on. Each binary names one; the CLI is shared.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use trireme_core::proxy::ProxyContext;

pub use trireme_tokio::RunOptions;

pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Runtime {
    pub name: &'static str,
    pub run: fn(Arc<ProxyContext>, RunOptions, std::net::TcpListener, Shutdown) -> io::Result<()>,
    pub bind: fn(std::net::SocketAddr) -> io::Result<std::net::TcpListener>,
}

pub const TOKIO: Runtime = Runtime {
    name: "tokio",
    run: |ctx, opts, l, sd| trireme_tokio::run(ctx, opts, l, sd),
    bind: trireme_tokio::bind,
};
