//! Exchanges the proxy makes on its own behalf: active health probes and the cache's
//! background fetches (stale-while-revalidate refreshes, warming). One worker of the runtime
//! carries them out on its own event loop, with no thread of their own: [`Background`]
//! hands out [`Run`]s (connect to `addr`, write the request, read, all before `deadline`)
//! and takes each back when its I/O ends ([`Background::finish`]), applying the verdict.
//!
//! A fetch picks its backend like any request ([`Attempts`]: counted in least_conn and
//! `max_conns` while in flight, outcomes to passive health) and, when it fails before any
//! response byte, comes back from `finish` as a run on another backend within the
//! upstream's `retries`. At most `cache.refresh_concurrency` fetches run at once; the rest
//! wait in the cache's bounded queue. The runtime is told when a fetch is queued through
//! [`crate::cache::http::HttpCache::set_refresher`].
//!
//! It also keeps the cache's own schedule ([`crate::cache::WarmingPlan`]: warming on cron
//! schedules, predictive refreshes of hot entries about to expire), queueing those fetches
//! when they come due; [`Background::next_deadline`] includes the next of them, so the
//! worker wakes for it like for a probe. No thread keeps time.

use crate::balance::PickInput;
use crate::cache::http::{HttpCache, Refresh};
use crate::proxy::ProxyContext;
use crate::upstream::{Attempts, Health, ProbeId, ProbeRun};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often predictive warming looks for hot entries about to expire.
pub const PREDICTIVE_SCAN: Duration = Duration::from_millis(500);

/// How a run's I/O ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The backend closed the connection (a fetch's response is whole then).
    Closed,
    /// [`Run::on_read`] said the run has what it needs.
    Done,
    /// Connecting, writing or reading failed, or the deadline passed.
    Failed,
}

enum Kind {
    Probe {
        run: ProbeRun,
        verdict: Option<Option<u16>>,
    },
    Fetch(Box<Fetch>),
}

struct Fetch {
    job: Refresh,
    attempts: Attempts,
    got: Vec<u8>,
    written: usize,
    limit: usize,
    too_large: bool,
}

/// One background exchange in flight (see the [module docs](self)).
pub struct Run {
    kind: Kind,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Give up (and [`finish`](Background::finish) with [`End::Failed`]) at this time; a
    /// fetch moves it on with every read (`response_timeout` between reads).
    pub deadline: Instant,
}

impl Run {
    /// Request bytes still to write.
    pub fn pending(&self) -> &[u8] {
        match &self.kind {
            Kind::Probe { run, .. } => run.pending(),
            Kind::Fetch(f) => &f.job.request[f.written.min(f.job.request.len())..],
        }
    }

    pub fn wrote(&mut self, n: usize) {
        match &mut self.kind {
            Kind::Probe { run, .. } => run.wrote(n),
            Kind::Fetch(f) => f.written += n,
        }
    }

    /// Bytes read at `now`; true when the run has what it needs (finish it with
    /// [`End::Done`]).
    pub fn on_read(&mut self, data: &[u8], now: Instant) -> bool {
        match &mut self.kind {
            Kind::Probe { run, verdict } => {
                *verdict = run.on_read(data);
                verdict.is_some()
            }
            Kind::Fetch(f) => {
                f.got.extend_from_slice(data);
                self.deadline = now + f.attempts.upstream().cfg.response_timeout;
                f.too_large = f.got.len() > f.limit;
                f.too_large
            }
        }
    }
}

/// The background exchanges of a process (see the [module docs](self)); one worker owns it.
pub struct Background {
    ctx: Arc<ProxyContext>,
    health: Health,
    cache: Option<Arc<HttpCache>>,
    fetches: usize,
    max_fetches: usize,
    /// When each of the cache's scheduled warmings runs next (wall clock).
    warm_next: Vec<Option<SystemTime>>,
    /// When predictive warming looks next.
    scan_next: Option<Instant>,
}

impl Background {
    /// The health checks of `ctx`'s upstreams and, with a cache, its background fetches
    /// (at most `refresh_concurrency` at once).
    pub fn new(ctx: &Arc<ProxyContext>, refresh_concurrency: usize, now: Instant) -> Self {
        let wall = ctx.clock.at(now);
        let plan = ctx.cache.as_ref().map(|c| &c.warming);
        Background {
            health: Health::for_context(ctx, now),
            cache: ctx.cache.clone(),
            ctx: ctx.clone(),
            fetches: 0,
            max_fetches: refresh_concurrency.max(1),
            warm_next: plan.map_or_else(Vec::new, |p| {
                p.scheduled
                    .iter()
                    .map(|(c, _)| c.next_after(wall))
                    .collect()
            }),
            // A first look at start-up.
            scan_next: plan.and_then(|p| p.predictive).map(|_| now),
        }
    }

    /// Nothing to do ever: no health checks, no cache.
    pub fn is_empty(&self) -> bool {
        self.health.is_empty() && self.cache.is_none()
    }

    /// Queue the cache's scheduled and predictive fetches that are due at `now`.
    fn warm(&mut self, now: Instant) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let plan = &cache.warming;
        if plan.is_empty() {
            return;
        }
        let wall = self.ctx.clock.at(now);
        if let Some((threshold, horizon)) = plan.predictive {
            if self.scan_next.is_some_and(|t| t <= now) {
                self.scan_next = Some(now + PREDICTIVE_SCAN);
                for (host, target, entry) in cache.hot_and_expiring(threshold, horizon, wall) {
                    let Some(up) = self.ctx.router.route(host.as_bytes(), target.as_bytes()) else {
                        continue;
                    };
                    let limits = &self.ctx.limits;
                    if let Some(job) =
                        cache.fetch_job(&host, &target, up as u16, limits, wall, Some(entry))
                    {
                        tracing::debug!(host = %host, target = %target, "predictive refresh");
                        cache.queue_refresh(job);
                    }
                }
            }
        }
        for (next, (cron, paths)) in self.warm_next.iter_mut().zip(&plan.scheduled) {
            if next.is_some_and(|t| t <= wall) {
                if let Some(host) = &plan.host {
                    let paths = paths.iter().map(String::as_str);
                    let n = queue_warming(&self.ctx, &cache, host, paths, wall);
                    tracing::info!(paths = n, host = %host, "scheduled cache warming");
                }
                *next = cron.next_after(wall);
            }
        }
    }

    /// The next run to start now, if any: a probe that is due, or a queued fetch while
    /// fewer than the bound run (warming that came due queued first).
    pub fn poll_run(&mut self, now: Instant) -> Option<Run> {
        self.warm(now);
        if let Some(run) = self.health.poll_probe(now) {
            return Some(Run {
                addr: run.addr,
                deadline: run.deadline,
                kind: Kind::Probe { run, verdict: None },
            });
        }
        let cache = self.cache.clone()?;
        while self.fetches < self.max_fetches {
            let job = cache.take_refresh()?;
            let up = self.ctx.upstreams.get(job.upstream as usize)?.clone();
            let mut attempts = Attempts::new(up);
            let Some(run) = self.attempt(&mut attempts, now) else {
                let name = &attempts.upstream().cfg.name;
                tracing::debug!(upstream = %name, "background fetch: no backend available");
                continue;
            };
            self.fetches += 1;
            let (addr, deadline) = run;
            return Some(Run {
                addr,
                deadline,
                kind: Kind::Fetch(Box::new(Fetch {
                    job,
                    attempts,
                    got: Vec::new(),
                    written: 0,
                    limit: cache.store.max_object() + 64 * 1024,
                    too_large: false,
                })),
            });
        }
        None
    }

    /// Begin an attempt: its backend's address and the run's first deadline.
    fn attempt(&self, attempts: &mut Attempts, now: Instant) -> Option<(SocketAddr, Instant)> {
        let input = PickInput {
            client: b"",
            key: None,
        };
        let b = attempts.begin(&input, now)?;
        let up = attempts.upstream();
        let deadline = now + up.cfg.connect_timeout + up.cfg.response_timeout;
        Some((up.backends[b].addr, deadline))
    }

    /// A run's I/O ended as `end` at `now`: a probe's verdict goes to the health checks; a
    /// fetch's response to the cache (a 304 refreshes the entry, a storable response
    /// replaces it), its outcome to passive health. A fetch that failed before any
    /// response byte comes back as a run on another backend while the retry budget lasts:
    /// start it like a new one.
    pub fn finish(&mut self, run: Run, end: End, now: Instant) -> Option<Run> {
        let Run { kind, addr, .. } = run;
        match kind {
            Kind::Probe { run, verdict } => {
                let verdict = match end {
                    End::Done => verdict.flatten(),
                    End::Closed | End::Failed => None,
                };
                let id: ProbeId = run.id;
                self.health.on_result(id, verdict, now);
                None
            }
            Kind::Fetch(mut f) => {
                if f.got.is_empty() {
                    // Nothing came back (refused, timed out, closed or reset before a byte):
                    // another backend may answer.
                    if f.attempts.failed(now, &self.ctx.metrics) {
                        if let Some((next, deadline)) = self.attempt(&mut f.attempts, now) {
                            tracing::debug!(backend = %addr, "background fetch: retrying on another backend");
                            f.written = 0;
                            return Some(Run {
                                addr: next,
                                deadline,
                                kind: Kind::Fetch(f),
                            });
                        }
                    }
                    tracing::warn!(backend = %addr, "background fetch failed: no response");
                    self.fetches -= 1;
                    return None;
                }
                self.fetches -= 1;
                let status = match crate::http1::head::parse_response(&f.got, 64 * 1024) {
                    Ok(crate::http1::Parsed::Complete(h)) if end == End::Closed => Some(h.status),
                    _ => None,
                };
                match status {
                    Some(s) => f.attempts.answered(s, now),
                    // Broken or cut off: the backend's fault; not retried (it has seen the
                    // request).
                    None if !f.too_large => f.attempts.broken(now),
                    None => f.attempts.answered(200, now),
                }
                let Some(cache) = &self.cache else {
                    return None;
                };
                if f.too_large {
                    tracing::debug!(backend = %addr, "background fetch: response too large to store");
                } else if end != End::Closed {
                    tracing::warn!(backend = %addr, "background fetch failed: the response broke off");
                } else {
                    match cache.absorb(f.job, &f.got, self.ctx.clock.at(now)) {
                        Ok(what) => tracing::debug!(backend = %addr, what, "background fetch"),
                        Err(e) => {
                            tracing::warn!(backend = %addr, error = %e, "background fetch failed")
                        }
                    }
                }
                None
            }
        }
    }

    /// When [`poll_run`](Self::poll_run) will next have a probe or warming to queue
    /// (queued fetches are announced through the cache's refresher callback instead).
    pub fn next_deadline(&self) -> Option<Instant> {
        let clock = &self.ctx.clock;
        let warm = self
            .warm_next
            .iter()
            .flatten()
            .map(|t| clock.instant_of(*t));
        let scan = self.scan_next;
        self.health
            .next_deadline()
            .into_iter()
            .chain(warm)
            .chain(scan)
            .min()
    }
}

/// Queue warming fetches of `paths` under `host` (routed like requests); how many were
/// queued. `wall`: now, on the wall clock.
pub fn queue_warming<'a>(
    ctx: &ProxyContext,
    cache: &Arc<HttpCache>,
    host: &str,
    paths: impl Iterator<Item = &'a str>,
    wall: SystemTime,
) -> usize {
    let mut queued = 0;
    for path in paths {
        let Some(up) = ctx.router.route(host.as_bytes(), path.as_bytes()) else {
            tracing::warn!(host, path, "cache warming: no route for this path");
            continue;
        };
        if let Some(job) = cache.fetch_job(host, path, up as u16, &ctx.limits, wall, None) {
            cache.queue_refresh(job);
            queued += 1;
        }
    }
    queued
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_warming_comes_due_on_the_worker_and_moves_on() {
        let t0 = crate::test_origin();
        let yaml = "cache:\n  size: 1MB\n  warming:\n    host: test\n    scheduled:\n      - cron: \"*/5 * * * * *\"\n        paths:\n          - /w\nbackends:\n  - url: http://127.0.0.1:9001\n";
        let ctx = crate::test_ctx(yaml, t0);
        let mut bg = Background::new(&ctx, 4, t0);
        // The test wall clock starts on a multiple of five seconds: the next one is due.
        let due = t0 + Duration::from_secs(5);
        assert_eq!(bg.next_deadline(), Some(due));
        assert!(bg.poll_run(due - Duration::from_millis(1)).is_none());
        let run = bg.poll_run(due).expect("the warming fetch");
        assert_eq!(run.addr, "127.0.0.1:9001".parse().unwrap());
        let req = String::from_utf8_lossy(run.pending()).into_owned();
        assert!(req.starts_with("GET /w HTTP/1.1\r\n"), "{req}");
        assert!(req.to_ascii_lowercase().contains("host: test\r\n"), "{req}");
        // Once queued, it runs once; the schedule moves to its next time.
        assert!(bg.poll_run(due).is_none());
        assert_eq!(bg.next_deadline(), Some(due + Duration::from_secs(5)));
    }

    #[test]
    fn predictive_warming_looks_at_start_and_then_every_scan() {
        let t0 = crate::test_origin();
        let yaml = "cache:\n  size: 1MB\n  warming:\n    predictive:\n      threshold: 3\n      horizon: 30s\nbackends:\n  - url: http://127.0.0.1:9001\n";
        let ctx = crate::test_ctx(yaml, t0);
        let mut bg = Background::new(&ctx, 4, t0);
        assert_eq!(bg.next_deadline(), Some(t0));
        // Nothing hot in an empty cache: no fetch, and the next look is a scan away.
        assert!(bg.poll_run(t0).is_none());
        assert_eq!(bg.next_deadline(), Some(t0 + PREDICTIVE_SCAN));
    }
}
