//! The admin listener's socket. Its connections are served by the runtime's first worker
//! like any other, as sessions of the admin context (`trireme_core::admin`: the endpoints,
//! the token, `admin.max_connections`, `admin.header_timeout`), so a slow admin client
//! holds no thread and stalls nothing.

use crate::runtimes::AdminListener;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use trireme_core::config::AdminSection;
use trireme_core::proxy::ProxyContext;

/// Bind `addr` for the admin endpoints of `ctx`.
pub fn bind(
    addr: SocketAddr,
    cfg: &AdminSection,
    ctx: &Arc<ProxyContext>,
) -> std::io::Result<AdminListener> {
    let listener = crate::process::bind_retrying(|| TcpListener::bind(addr))?;
    let bound = listener.local_addr()?;
    if cfg.token.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            admin = %bound,
            "the admin listener is reachable beyond loopback and has no admin.token: anyone \
             who can connect can purge the cache and read metrics"
        );
    }
    Ok(AdminListener {
        listener,
        ctx: trireme_core::admin::context(ctx, cfg),
    })
}
