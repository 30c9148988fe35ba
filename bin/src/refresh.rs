//! When the cache fetches on its own: the schedule of warming (`cache.warming.scheduled`,
//! cron) and predictive warming (hot entries about to expire), queued as background
//! fetches. Sessions queue stale-while-revalidate refreshes the same way. The fetches
//! themselves run on the runtime's first worker (core's `background::Background`: picked,
//! counted and retried like requests, at most `cache.refresh_concurrency` at once); this
//! thread only keeps time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use trireme_core::cache::http::HttpCache;
use trireme_core::cache::CronSchedule;
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;

/// Start the warming schedule when the cache is on (`cache.warming.scheduled`, predictive
/// warming).
pub fn spawn(
    ctx: &Arc<ProxyContext>,
    cfg: &trireme_core::config::Config,
    sd: Arc<Shutdown>,
) -> std::io::Result<()> {
    let Some(cache) = ctx.cache.clone() else {
        return Ok(());
    };
    let warming = cfg.file.cache.as_ref().and_then(|c| c.warming.as_ref());
    let host = warming.and_then(|w| w.host.clone());
    let mut schedules: Vec<(CronSchedule, Vec<String>, Option<SystemTime>)> = warming
        .filter(|w| w.enabled)
        .map(|w| {
            w.scheduled
                .iter()
                .filter_map(|s| {
                    let c = CronSchedule::parse(&s.cron).ok()?;
                    let next = c.next_after(SystemTime::now());
                    Some((c, s.paths.clone(), next))
                })
                .collect()
        })
        .unwrap_or_default();
    let predictive = warming
        .filter(|w| w.enabled)
        .and_then(|w| w.predictive.as_ref())
        .filter(|p| p.enabled)
        .map(|p| (p.threshold, p.horizon.0));
    if schedules.is_empty() && predictive.is_none() {
        return Ok(());
    }
    let ctx = ctx.clone();
    let c2 = cache.clone();
    let t = std::thread::Builder::new()
        .name("trireme-refresh".into())
        .spawn(move || {
            let mut next_scan = SystemTime::now();
            while !sd.is_requested() {
                let now = SystemTime::now();
                if let Some((threshold, horizon)) = predictive.filter(|_| now >= next_scan) {
                    next_scan = now + PREDICTIVE_SCAN;
                    for (host, target, entry) in c2.hot_and_expiring(threshold, horizon, now) {
                        let Some(up) = ctx.router.route(host.as_bytes(), target.as_bytes()) else {
                            continue;
                        };
                        let job =
                            c2.fetch_job(&host, &target, up as u16, &ctx.limits, now, Some(entry));
                        if let Some(job) = job {
                            tracing::debug!(host = %host, target = %target, "predictive refresh");
                            c2.queue_refresh(job);
                        }
                    }
                }
                for (cron, paths, next) in schedules.iter_mut() {
                    if next.is_some_and(|t| t <= now) {
                        if let Some(host) = &host {
                            let n =
                                queue_warming(&ctx, &c2, host, paths.iter().map(String::as_str));
                            tracing::info!(paths = n, host = %host, "scheduled cache warming");
                        }
                        *next = cron.next_after(now);
                    }
                }
                let due = schedules
                    .iter()
                    .filter_map(|(_, _, n)| *n)
                    .chain(predictive.map(|_| next_scan))
                    .min()
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::from_millis(200));
                std::thread::park_timeout(due.min(Duration::from_millis(200)));
            }
        })?;
    drop(t);
    Ok(())
}

/// How often predictive warming looks for hot entries about to expire.
const PREDICTIVE_SCAN: Duration = Duration::from_millis(500);

/// Queue warming fetches for `paths` under `host`; how many were queued.
fn queue_warming<'a>(
    ctx: &ProxyContext,
    cache: &Arc<HttpCache>,
    host: &str,
    paths: impl Iterator<Item = &'a str>,
) -> usize {
    let mut queued = 0;
    for path in paths {
        let Some(up) = ctx.router.route(host.as_bytes(), path.as_bytes()) else {
            tracing::warn!(host, path, "cache warming: no route for this path");
            continue;
        };
        if let Some(job) =
            cache.fetch_job(host, path, up as u16, &ctx.limits, SystemTime::now(), None)
        {
            cache.queue_refresh(job);
            queued += 1;
        }
    }
    queued
}

/// Queue the configured start-up warming (`cache.warming.on_startup`, `cache.preload`, and
/// the scheduled paths once).
pub fn warm(ctx: &ProxyContext, cfg: &trireme_core::config::Config) {
    let (Some(cache), Some(cs)) = (&ctx.cache, &cfg.file.cache) else {
        return;
    };
    let (Some(host), paths) = cs.warm_paths() else {
        return;
    };
    let queued = queue_warming(ctx, cache, host, paths.into_iter());
    if queued > 0 {
        tracing::info!(paths = queued, host, "cache warming started");
    }
}
