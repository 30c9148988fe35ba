//! Start-up warming: the configured paths (`cache.warming.on_startup`, `cache.preload`, and
//! the scheduled paths once) queued as background fetches before the runtime starts. The
//! fetches run on the runtime's first worker, and so do the schedule's later ones (core's
//! `background::Background` keeps that time: no thread of trireme's does).

use std::time::SystemTime;
use trireme_core::background::queue_warming;
use trireme_core::proxy::ProxyContext;

/// Queue the configured start-up warming.
pub fn warm(ctx: &ProxyContext, cfg: &trireme_core::config::Config) {
    let (Some(cache), Some(cs)) = (&ctx.cache, &cfg.file.cache) else {
        return;
    };
    let (Some(host), paths) = cs.warm_paths() else {
        return;
    };
    let queued = queue_warming(ctx, cache, host, paths.into_iter(), SystemTime::now());
    if queued > 0 {
        tracing::info!(paths = queued, host, "cache warming started");
    }
}
