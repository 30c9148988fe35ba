//! The event models a binary can run on. Each binary names one; the CLI is shared.

use std::io;
use std::sync::Arc;
use trireme_core::config::{RunOptions, TokioFlavor};
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;

pub use trireme_rt_support::{AdminListener, Listeners};

/// Serve on these listeners until shutdown is requested, then drain. Blocks.
pub type RunFn = fn(Arc<ProxyContext>, RunOptions, Listeners, Arc<Shutdown>) -> io::Result<()>;

pub struct Runtime {
    pub name: &'static str,
    pub run: RunFn,
    /// How many listening sockets `run` wants (one per thread-per-core worker).
    pub listeners: fn(&RunOptions) -> usize,
    /// Upstream connection pools in the process (one per worker, or one shared).
    pub pools: fn(&RunOptions) -> usize,
}

pub const TOKIO: Runtime = Runtime {
    name: "tokio",
    run: trireme_tokio::run,
    listeners: |o| match o.tokio_flavor {
        TokioFlavor::MultiThread => 1,
        TokioFlavor::CurrentThread => o.workers,
    },
    pools: |_| 1,
};

pub const MIO: Runtime = Runtime {
    name: "mio",
    run: trireme_mio::run,
    listeners: |o| o.workers,
    pools: |o| o.workers,
};

pub const MONOIO: Runtime = Runtime {
    name: "monoio",
    run: trireme_monoio::run,
    listeners: |o| o.workers,
    pools: |o| o.workers,
};
