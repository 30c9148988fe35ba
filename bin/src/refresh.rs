//! Background refreshes for the cache (`stale-while-revalidate`): the sessions serve the
//! stale entry at once and queue a refresh; this service carries it out with blocking
//! sockets on its own threads (at most `cache.refresh_concurrency` at once), whatever the
//! event model, and hands the answer to the cache (a 304 refreshes the entry, a storable
//! 200 replaces it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use trireme_core::balance::PickInput;
use trireme_core::cache::http::{HttpCache, Refresh};
use trireme_core::cache::CronSchedule;
use trireme_core::http1::head::{parse_response, Parsed};
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;
use trireme_core::upstream::Attempts;

/// Start the refresher when the cache is on: background refreshes, and the scheduled
/// warming of `cache.warming.scheduled`.
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
    let concurrency = cfg
        .file
        .cache
        .as_ref()
        .map_or(16, |c| c.refresh_concurrency.max(1));
    let running = Arc::new(AtomicUsize::new(0));
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
                // At most `concurrency` refreshes at once, each on its own thread (a slow
                // backend holds up no other); the rest wait in the cache's bounded queue.
                while running.load(Ordering::Acquire) < concurrency {
                    let Some(job) = c2.take_refresh() else { break };
                    let (ctx, cache, slot) = (ctx.clone(), c2.clone(), running.clone());
                    let me = std::thread::current();
                    running.fetch_add(1, Ordering::AcqRel);
                    let spawned = std::thread::Builder::new()
                        .name("trireme-refresh-job".into())
                        .spawn(move || {
                            refresh(&ctx, &cache, job);
                            slot.fetch_sub(1, Ordering::AcqRel);
                            // A slot is free: the next queued refresh may start.
                            me.unpark();
                        });
                    if let Err(e) = spawned {
                        running.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(error = %e, "cannot start a background refresh");
                        break;
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
    let th = t.thread().clone();
    cache.set_refresher(move || th.unpark());
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

/// One refresh: its backend picked and counted like any request's (least_conn,
/// `max_conns`), its outcome reported to passive health, and an attempt that fails before
/// any response retried on another backend within the upstream's `retries`
/// ([`Attempts`]).
fn refresh(ctx: &ProxyContext, cache: &Arc<HttpCache>, job: Refresh) {
    let up = ctx.upstreams[job.upstream as usize].clone();
    let mut attempts = Attempts::new(up.clone());
    let input = PickInput {
        client: b"",
        key: None,
    };
    let limit = cache.store.max_object() + 64 * 1024;
    loop {
        let Some(b) = attempts.begin(&input, Instant::now()) else {
            tracing::debug!(upstream = %up.cfg.name, "background refresh: no backend available");
            return;
        };
        let addr = up.backends[b].addr;
        let mut buf = Vec::with_capacity(4096);
        let fetched = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, up.cfg.connect_timeout)?;
            s.set_write_timeout(Some(up.cfg.response_timeout))?;
            s.set_read_timeout(Some(up.cfg.response_timeout))?;
            s.write_all(&job.request)?;
            s.take(limit as u64 + 1).read_to_end(&mut buf)?;
            Ok(())
        })();
        if buf.is_empty() {
            // Nothing came back (refused, timed out, closed or reset before a byte): not
            // the refresh's fault; another backend may answer.
            let why = fetched
                .err()
                .map_or("closed without a response".into(), |e| e.to_string());
            if attempts.failed(Instant::now(), &ctx.metrics) {
                tracing::debug!(backend = %addr, error = %why, "background refresh: retrying on another backend");
                continue;
            }
            tracing::warn!(backend = %addr, error = %why, "background refresh failed");
            return;
        }
        let status = match parse_response(&buf, 64 * 1024) {
            Ok(Parsed::Complete(h)) if fetched.is_ok() => Some(h.status),
            _ => None,
        };
        match status {
            Some(s) => attempts.answered(s, Instant::now()),
            // A broken or cut-off response: the backend's fault; not retried (the
            // backend has seen the request).
            None => attempts.broken(Instant::now()),
        }
        match fetched {
            Err(e) => tracing::warn!(backend = %addr, error = %e, "background refresh failed"),
            Ok(()) if buf.len() > limit => {
                tracing::debug!(backend = %addr, "background refresh: response too large to store")
            }
            Ok(()) => match cache.absorb(job, &buf, SystemTime::now()) {
                Ok(what) => tracing::debug!(backend = %addr, what, "background refresh"),
                Err(e) => tracing::warn!(backend = %addr, error = %e, "background refresh failed"),
            },
        }
        return;
    }
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
