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

use crate::balance::PickInput;
use crate::cache::http::{HttpCache, Refresh};
use crate::proxy::ProxyContext;
use crate::upstream::{Attempts, Health, ProbeId, ProbeRun};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

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
}

impl Background {
    /// The health checks of `ctx`'s upstreams and, with a cache, its background fetches
    /// (at most `refresh_concurrency` at once).
    pub fn new(ctx: &Arc<ProxyContext>, refresh_concurrency: usize, now: Instant) -> Self {
        Background {
            health: Health::for_context(ctx, now),
            cache: ctx.cache.clone(),
            ctx: ctx.clone(),
            fetches: 0,
            max_fetches: refresh_concurrency.max(1),
        }
    }

    /// Nothing to do ever: no health checks, no cache.
    pub fn is_empty(&self) -> bool {
        self.health.is_empty() && self.cache.is_none()
    }

    /// The next run to start now, if any: a probe that is due, or a queued fetch while
    /// fewer than the bound run.
    pub fn poll_run(&mut self, now: Instant) -> Option<Run> {
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

    /// When [`poll_run`](Self::poll_run) will next have a probe (queued fetches are
    /// announced through the cache's refresher callback instead).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.health.next_deadline()
    }
}
