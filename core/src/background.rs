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
//! With an L2 tier it also keeps the tier's two long-lived Redis connections as runs
//! ([`crate::cache::l2_conn`]): the writer, opened when L2 work is queued and kept while
//! Redis keeps it, and the subscriber, always on. Their runs do not end on their own: after
//! each read they may have more to write ([`Run::pending`] again), and when work is queued
//! for an idle writer the runtime lets every run in flight look for it ([`Run::refill`]).
//! A failed writer or subscriber is started again after [`RETRY`] (a refused subscription
//! after [`REFUSED_RETRY`]).
//!
//! It also keeps the cache's own schedule ([`crate::cache::WarmingPlan`]: warming on cron
//! schedules, predictive refreshes of hot entries about to expire), queueing those fetches
//! when they come due; [`Background::next_deadline`] includes the next of them, so the
//! worker wakes for it like for a probe. No thread keeps time.

use crate::balance::PickInput;
use crate::cache::http::{HttpCache, Refresh};
use crate::cache::l2_conn::{SubError, Subscriber, Writer, IO_TIMEOUT, REFUSED_RETRY, RETRY};
use crate::proxy::ProxyContext;
use crate::upstream::{Attempts, Health, ProbeId, ProbeRun};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
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
    L2(Box<L2Run>),
}

/// One of the L2 tier's connections (see the [module docs](self)).
struct L2Run {
    cache: Arc<HttpCache>,
    conv: Conv,
    /// Why the conversation cannot go on (the run is then done).
    error: Option<Result<String, SubError>>,
    /// A reply arrived on this connection (Redis was reached).
    heard: bool,
}

enum Conv {
    Write(Writer),
    Sub(Subscriber),
}

/// How long an L2 connection with nothing awaited stays before it is opened again (a
/// connection that went quiet may be gone without a word).
const L2_IDLE: Duration = Duration::from_secs(3600);

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
    /// Bytes to write next: write until it is empty (it may come in parts, e.g. an L2
    /// write's stored body after its command). Runs that keep their connection (L2's) may
    /// have more after a read or a [`refill`](Self::refill).
    pub fn pending(&self) -> &[u8] {
        match &self.kind {
            Kind::Probe { run, .. } => run.pending(),
            Kind::Fetch(f) => &f.job.request[f.written.min(f.job.request.len())..],
            Kind::L2(r) => match &r.conv {
                Conv::Write(w) => w.pending(),
                Conv::Sub(s) => s.pending(),
            },
        }
    }

    pub fn wrote(&mut self, n: usize) {
        match &mut self.kind {
            Kind::Probe { run, .. } => run.wrote(n),
            Kind::Fetch(f) => f.written += n,
            Kind::L2(r) => match &mut r.conv {
                Conv::Write(w) => w.wrote(n),
                Conv::Sub(s) => s.wrote(n),
            },
        }
    }

    /// Work was queued for the process's background runs: an idle L2 writer takes it.
    /// True when there is something to write now.
    pub fn refill(&mut self, now: Instant) -> bool {
        let Kind::L2(r) = &mut self.kind else {
            return false;
        };
        let (Conv::Write(w), Some(l2)) = (&mut r.conv, r.cache.l2.as_ref()) else {
            return false;
        };
        let more = w.refill(l2);
        if w.awaits_reply() {
            self.deadline = self.deadline.min(now + IO_TIMEOUT);
        }
        more
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
            Kind::L2(r) => {
                let Some(l2) = r.cache.l2.as_ref() else {
                    return true;
                };
                r.heard = true;
                match &mut r.conv {
                    Conv::Write(w) => {
                        if let Err(e) = w.on_read(l2, data) {
                            r.error = Some(Ok(e));
                            return true;
                        }
                        if w.is_idle() && l2.writer_down.swap(false, Relaxed) {
                            tracing::info!(redis = %l2.addr, "L2 writer: Redis answers again");
                        }
                        // The next queued op at once, on the same connection.
                        w.refill(l2);
                        self.deadline = now
                            + if w.awaits_reply() {
                                IO_TIMEOUT
                            } else {
                                L2_IDLE
                            };
                        false
                    }
                    Conv::Sub(s) => match s.on_read(&r.cache, data) {
                        Ok(confirmed) => {
                            if s.is_subscribed() {
                                // Quiet for L2_IDLE (no message, no close): opened again.
                                self.deadline = now + L2_IDLE;
                            }
                            if confirmed && l2.subscriber_down.swap(false, Relaxed) {
                                tracing::info!(redis = %l2.addr, "L2 subscriber: subscribed again (invalidations sent meanwhile are not replayed)");
                            }
                            false
                        }
                        Err(e) => {
                            r.error = Some(Err(e));
                            true
                        }
                    },
                }
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
    /// The L2 writer's run is out; when it may start again after a failure.
    l2_writer: bool,
    l2_writer_retry: Option<Instant>,
    /// The L2 subscriber's run is out; when it may start again.
    l2_sub: bool,
    l2_sub_retry: Option<Instant>,
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
            l2_writer: false,
            l2_writer_retry: None,
            l2_sub: false,
            l2_sub_retry: None,
        }
    }

    /// The L2 tier's runs to start now: the subscriber when none is out (and no retry
    /// waits), the writer when work is queued and none is out.
    fn poll_l2(&mut self, now: Instant) -> Option<Run> {
        let cache = self.cache.as_ref()?;
        let l2 = cache.l2.as_ref()?;
        let conv = if !self.l2_sub && self.l2_sub_retry.is_none_or(|t| t <= now) {
            self.l2_sub = true;
            self.l2_sub_retry = None;
            Conv::Sub(Subscriber::new(l2, &l2.instance()))
        } else if !self.l2_writer && self.l2_writer_retry.is_none_or(|t| t <= now) && l2.has_ops() {
            self.l2_writer = true;
            self.l2_writer_retry = None;
            let mut w = Writer::new(l2, &l2.instance());
            w.refill(l2);
            Conv::Write(w)
        } else {
            return None;
        };
        Some(Run {
            addr: l2.addr,
            deadline: now + IO_TIMEOUT,
            kind: Kind::L2(Box::new(L2Run {
                cache: cache.clone(),
                conv,
                error: None,
                heard: false,
            })),
        })
    }

    /// An L2 run ended: the writer's op in flight goes by the queue's rules (a write
    /// dropped, a deletion kept; with Redis unreachable every queued write is dropped),
    /// and a failed writer or any subscriber is started again after a while.
    fn finish_l2(&mut self, r: L2Run, end: End, late: bool, now: Instant) {
        let Some(l2) = r.cache.l2.as_ref() else {
            return;
        };
        let ended = match end {
            End::Closed => "Redis closed the connection",
            End::Done => "a bad reply",
            End::Failed => "connect, I/O or reply timed out or failed",
        };
        match r.conv {
            Conv::Write(w) => {
                self.l2_writer = false;
                let why = match r.error {
                    Some(Ok(e)) => Some(e),
                    Some(Err(e)) => Some(e.to_string()),
                    // Gone while idle (Redis's own timeout): opened again with the next op.
                    None if w.is_idle() => None,
                    None => Some(ended.to_string()),
                };
                let Some(why) = why else { return };
                if !r.heard {
                    // Unreachable: what is queued is dropped, deletions wait.
                    l2.drop_writes();
                }
                w.fail(l2, &why);
                if !l2.writer_down.swap(true, Relaxed) {
                    tracing::warn!(redis = %l2.addr, error = %why, "L2 writer: Redis failed; writes are dropped and deletions retried every second until it answers");
                }
                // A refusing or vanished Redis is not retried in a tight loop.
                self.l2_writer_retry = Some(now + RETRY);
            }
            Conv::Sub(s) => {
                self.l2_sub = false;
                if late && end == End::Failed && r.error.is_none() && s.is_subscribed() {
                    // Nothing came for L2_IDLE: not a failure; subscribed again at once.
                    tracing::debug!(redis = %l2.addr, "L2 subscriber: quiet; subscribing again");
                    self.l2_sub_retry = None;
                    return;
                }
                let (why, wait) = match r.error {
                    Some(Err(e @ SubError::Refused(_))) => (e.to_string(), REFUSED_RETRY),
                    Some(Err(e)) => (e.to_string(), RETRY),
                    Some(Ok(e)) => (e, RETRY),
                    None => (ended.to_string(), RETRY),
                };
                if !l2.subscriber_down.swap(true, Relaxed) {
                    tracing::warn!(redis = %l2.addr, error = %why, "L2 subscriber: no subscription; invalidations by other instances are not received until it works (channel {:?})", String::from_utf8_lossy(&l2.channel()));
                }
                self.l2_sub_retry = Some(now + wait);
            }
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
        if let Some(run) = self.poll_l2(now) {
            return Some(run);
        }
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
        let late = run.deadline <= now;
        let Run { kind, addr, .. } = run;
        match kind {
            Kind::L2(r) => {
                self.finish_l2(*r, end, late, now);
                None
            }
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
        // L2 runs to start again after a failure.
        let l2 = self.cache.as_ref().and_then(|c| c.l2.as_ref());
        let sub = self.l2_sub_retry.filter(|_| !self.l2_sub);
        let writer = self
            .l2_writer_retry
            .filter(|_| !self.l2_writer && l2.is_some_and(|l| l.has_ops()));
        self.health
            .next_deadline()
            .into_iter()
            .chain(warm)
            .chain(scan)
            .chain(sub)
            .chain(writer)
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

    /// Everything `run` has to write now, as a write loop takes it.
    fn written(run: &mut Run) -> String {
        let mut s = Vec::new();
        while !run.pending().is_empty() {
            let n = run.pending().len();
            s.extend_from_slice(run.pending());
            run.wrote(n);
        }
        String::from_utf8_lossy(&s).into_owned()
    }

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
    fn the_l2_writer_keeps_its_connection_and_the_subscriber_comes_back() {
        let t0 = crate::test_origin();
        let yaml = "cache:\n  size: 1MB\n  l2:\n    host: 127.0.0.1\n    port: 6379\nbackends:\n  - url: http://127.0.0.1:9001\n";
        let ctx = crate::test_ctx(yaml, t0);
        let cache = ctx.cache.clone().unwrap();
        let l2 = cache.l2.as_ref().unwrap();
        // The runtime's wake-up for queued work is the L2 writer's too.
        cache.set_refresher(|| {});
        let mut bg = Background::new(&ctx, 4, t0);
        // The subscriber first, always on.
        let mut sub = bg.poll_run(t0).expect("the subscriber");
        assert_eq!(sub.addr, l2.addr);
        assert!(String::from_utf8_lossy(sub.pending()).contains("SUBSCRIBE"));
        let n = sub.pending().len();
        sub.wrote(n);
        let confirm = crate::cache::l2_conn::test_confirmation(l2);
        assert!(!sub.on_read(&confirm, t0), "a subscription does not end");
        // No writer while nothing is queued.
        assert!(bg.poll_run(t0).is_none());
        let entry = |body: &[u8]| crate::cache::store::test_entry(body, ctx.clock.at(t0));
        l2.queue_set(b"k1", entry(b"one"));
        let mut w = bg.poll_run(t0).expect("the writer, with work queued");
        assert!(written(&mut w).contains("one"));
        assert!(
            !w.on_read(b":1\r\n:1\r\n", t0),
            "the writer keeps its connection"
        );
        assert!(w.pending().is_empty() && w.deadline > t0 + Duration::from_secs(60));
        assert_eq!(l2.stats.writes.load(Relaxed), 1);
        // More work: no second writer; the one out takes it when the runtime asks.
        l2.queue_set(b"k2", entry(b"two"));
        assert!(bg.poll_run(t0).is_none());
        assert!(w.refill(t0));
        assert!(written(&mut w).contains("two"));
        assert!(w.deadline <= t0 + IO_TIMEOUT, "a reply is awaited");
        // Redis goes away with that write in flight: dropped (counted), and a writer is
        // started again only after RETRY, with work queued.
        assert!(bg.finish(w, End::Failed, t0).is_none());
        assert_eq!(l2.stats.dropped.load(Relaxed), 1);
        l2.queue_delete(b"k3", false);
        assert!(bg.poll_run(t0).is_none());
        assert_eq!(bg.next_deadline(), Some(t0 + RETRY));
        let mut w = bg.poll_run(t0 + RETRY).expect("the writer again");
        assert!(written(&mut w).contains("UNLINK"));
        // Every message moves the subscription's deadline; a quiet one past it is opened
        // again at once, not counted as down.
        let later = t0 + Duration::from_secs(600);
        let msg = crate::cache::l2_conn::test_message(l2, "x k/a/b");
        assert!(!sub.on_read(&msg, later));
        assert_eq!(sub.deadline, later + L2_IDLE);
        let quiet = bg.finish(sub, End::Failed, later + L2_IDLE);
        assert!(quiet.is_none() && !l2.subscriber_down.load(Relaxed));
        let mut sub = bg
            .poll_run(later + L2_IDLE)
            .expect("subscribed again at once");
        written(&mut sub);
        assert!(!sub.on_read(&confirm, t0));
        // The subscription breaks: subscribed again after RETRY.
        assert!(bg.finish(sub, End::Closed, t0).is_none());
        let at = t0 + Duration::from_millis(1500);
        let again = bg.poll_run(at).expect("the subscriber again");
        assert!(String::from_utf8_lossy(again.pending()).contains("SUBSCRIBE"));
        drop(w);
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
