//! Backend sets: shared health and load state, passive ejection, the upstream keep-alive
//! pool and active health probing. Shared between worker threads through atomics and the
//! balancer's own locks; no clock is read here, `now` always comes in.

use crate::balance::{Algorithm, Avail, Balancer, HashMethod, PickInput};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the request's hash key comes from for `consistent_hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    Cookie(String),
    Path,
    ClientIp,
}

/// Passive health: eject a backend after `max_fails` consecutive failures for `fail_timeout`.
#[derive(Clone, Debug)]
pub struct PassiveHealth {
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Count 5xx responses as failures (connect errors, resets and timeouts always count).
    /// Off by default, as in nginx: one endpoint's 500s say nothing about the backend.
    pub on_5xx: bool,
    /// Panic mode, in percent of the upstream's backends (Envoy's healthy panic threshold):
    /// when fewer than this share are healthy (not ejected, not failing probes), health is
    /// ignored and requests are balanced over every backend, so an upstream never turns
    /// away all traffic because its backends look bad. 0 turns panic mode off.
    pub panic_threshold: u8,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
            on_5xx: false,
            panic_threshold: 50,
        }
    }
}

/// Active HTTP health probes.
#[derive(Clone, Debug)]
pub struct ActiveHealth {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Accepted status range, inclusive (default 200-399).
    pub expected_status: (u16, u16),
}

impl Default for ActiveHealth {
    fn default() -> Self {
        ActiveHealth {
            path: "/".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_status: (200, 399),
        }
    }
}

/// Upstream keep-alive pool limits (per backend, per worker).
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub enabled: bool,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub max_requests: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            max_idle: 64,
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(600),
            max_requests: 10_000,
        }
    }
}

/// Per-upstream policy.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    pub algorithm: Algorithm,
    pub hash_method: HashMethod,
    pub hash_key: HashKey,
    pub seed: u64,
    pub passive: PassiveHealth,
    pub active: Option<ActiveHealth>,
    pub pool: PoolConfig,
    /// Further attempts on other backends for idempotent requests whose connect failed.
    pub retries: u32,
    pub connect_timeout: Duration,
    /// Time to wait for the backend between two reads (first byte included).
    pub response_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// Host header value for probes and for HTTP/1.0 requests without Host.
    pub host: String,
    pub weight: u32,
    /// Requests in flight to it at most, all workers together (0: no limit). Beyond it
    /// the balancer picks another backend, or the request gets a 503.
    pub max_conns: u32,
}

/// One backend's shared state.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub host: String,
    pub weight: u32,
    /// See [`BackendConfig::max_conns`].
    pub max_conns: u32,
    key: Vec<u8>,
    /// Verdict of active probes.
    healthy: AtomicBool,
    /// Passive ejection: unavailable until this many nanoseconds after the upstream's base.
    down_until: AtomicU64,
    consecutive_fails: AtomicU32,
    /// Requests in flight, all workers.
    pub active: AtomicU32,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
}

impl Backend {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// A named set of backends with its balancer.
pub struct Upstream {
    pub id: u16,
    pub cfg: UpstreamConfig,
    pub backends: Vec<Backend>,
    balancer: Balancer,
    /// Reference instant for the nanosecond timestamps in backend state.
    base: Instant,
    /// Health marks set, over all backends: one per passive ejection not yet seen to end,
    /// one per backend failing its probes. Zero (the usual case) lets a pick skip the
    /// panic-mode count.
    marks: AtomicU32,
    /// Picks made in panic mode (health ignored).
    pub panic_picks: AtomicU64,
    panic_logged: AtomicBool,
}

/// View used by balancers: availability at a given time.
struct AvailAt<'a> {
    backends: &'a [Backend],
    now_ns: u64,
    /// Panic mode: health is ignored, only `max_conns` still applies.
    panic: bool,
}

impl Avail for AvailAt<'_> {
    fn len(&self) -> usize {
        self.backends.len()
    }
    fn available(&self, i: usize) -> bool {
        let b = &self.backends[i];
        (self.panic
            || (b.healthy.load(Ordering::Relaxed)
                && b.down_until.load(Ordering::Relaxed) <= self.now_ns))
            && (b.max_conns == 0 || b.active.load(Ordering::Relaxed) < b.max_conns)
    }
    fn weight(&self, i: usize) -> u32 {
        self.backends[i].weight
    }
    fn active(&self, i: usize) -> u32 {
        self.backends[i].active.load(Ordering::Relaxed)
    }
    fn key(&self, i: usize) -> &[u8] {
        &self.backends[i].key
    }
}

impl Upstream {
    /// `base` is any instant not later than the first `now` the runtime will pass.
    pub fn new(id: u16, cfg: UpstreamConfig, base: Instant) -> Self {
        let backends: Vec<Backend> = cfg
            .backends
            .iter()
            .map(|b| Backend {
                addr: b.addr,
                host: b.host.clone(),
                weight: b.weight.max(1),
                max_conns: b.max_conns,
                key: b.addr.to_string().into_bytes(),
                healthy: AtomicBool::new(true),
                down_until: AtomicU64::new(0),
                consecutive_fails: AtomicU32::new(0),
                active: AtomicU32::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            })
            .collect();
        let view = AvailAt {
            backends: &backends,
            now_ns: 0,
            panic: false,
        };
        let balancer = Balancer::new(cfg.algorithm, cfg.hash_method, &view, cfg.seed);
        Upstream {
            id,
            backends,
            balancer,
            cfg,
            base,
            marks: AtomicU32::new(0),
            panic_picks: AtomicU64::new(0),
            panic_logged: AtomicBool::new(false),
        }
    }

    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether backend `i` takes requests now, panic mode included.
    pub fn is_available(&self, i: usize, now: Instant) -> bool {
        let now_ns = self.ns(now);
        AvailAt {
            backends: &self.backends,
            now_ns,
            panic: self.in_panic(now_ns),
        }
        .available(i)
    }

    /// Pick a backend for a request, skipping unavailable ones and `exclude`.
    pub fn pick(&self, input: &PickInput<'_>, exclude: &[u16], now: Instant) -> Option<usize> {
        let now_ns = self.ns(now);
        let panic = self.in_panic(now_ns);
        if panic {
            self.panic_picks.fetch_add(1, Ordering::Relaxed);
        }
        let view = AvailAt {
            backends: &self.backends,
            now_ns,
            panic,
        };
        self.balancer.pick(&view, input, exclude)
    }

    /// Ends the passive ejections whose time is up (logging each, as its start was), then
    /// says whether fewer than `panic_threshold` percent of the backends are healthy.
    /// Costs one atomic load while no backend carries a mark.
    fn in_panic(&self, now_ns: u64) -> bool {
        if self.marks.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut healthy = 0usize;
        for b in &self.backends {
            let until = b.down_until.load(Ordering::Relaxed);
            if until != 0
                && until <= now_ns
                && b.down_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.marks.fetch_sub(1, Ordering::Relaxed);
                tracing::info!(
                    upstream = %self.cfg.name,
                    backend = %b.addr,
                    "backend ejection over: taking requests again"
                );
            }
            if b.healthy.load(Ordering::Relaxed) && b.down_until.load(Ordering::Relaxed) == 0 {
                healthy += 1;
            }
        }
        let threshold = self.cfg.passive.panic_threshold as usize;
        let panic = healthy * 100 < threshold * self.backends.len();
        if self.panic_logged.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(
                    upstream = %self.cfg.name,
                    healthy,
                    backends = self.backends.len(),
                    threshold_percent = threshold,
                    "panic mode: too few healthy backends, balancing over all of them"
                );
            } else {
                tracing::info!(upstream = %self.cfg.name, healthy, "panic mode over");
            }
        }
        panic
    }

    /// Assign a request to backend `i` if it is below its `max_conns` (checked and taken
    /// in one step, so workers racing for the last slot cannot both win). Pair a `true`
    /// with [`end`](Self::end).
    pub fn try_begin(&self, i: usize) -> bool {
        let b = &self.backends[i];
        let max = b.max_conns;
        let took = b
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                (max == 0 || v < max).then_some(v + 1)
            })
            .is_ok();
        if took {
            b.requests.fetch_add(1, Ordering::Relaxed);
            self.balancer.on_begin(i);
        }
        took
    }

    pub fn end(&self, i: usize) {
        let b = &self.backends[i];
        let _ = b
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        self.balancer.on_end(i);
    }

    /// Passive health: a connect failure, timeout, or (if configured) 5xx.
    pub fn report_failure(&self, i: usize, now: Instant) {
        let b = &self.backends[i];
        b.failures.fetch_add(1, Ordering::Relaxed);
        let max = self.cfg.passive.max_fails;
        if max == 0 {
            return;
        }
        let fails = b.consecutive_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= max {
            b.consecutive_fails.store(0, Ordering::Relaxed);
            // At least 1: 0 means "not ejected".
            let until = (self.ns(now) + self.cfg.passive.fail_timeout.as_nanos() as u64).max(1);
            if b.down_until.swap(until, Ordering::Relaxed) == 0 {
                self.marks.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                upstream = %self.cfg.name,
                backend = %b.addr,
                fails,
                for_secs = self.cfg.passive.fail_timeout.as_secs_f64(),
                "backend ejected after consecutive failures"
            );
        }
    }

    /// Passive health: the backend answered.
    pub fn report_success(&self, i: usize) {
        self.backends[i]
            .consecutive_fails
            .store(0, Ordering::Relaxed);
    }

    /// Active health verdict.
    pub fn set_healthy(&self, i: usize, healthy: bool) {
        let b = &self.backends[i];
        let was = b.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            if healthy {
                self.marks.fetch_sub(1, Ordering::Relaxed);
                // Re-admitted by probes: clear any passive ejection too.
                if b.down_until.swap(0, Ordering::Relaxed) != 0 {
                    self.marks.fetch_sub(1, Ordering::Relaxed);
                }
                b.consecutive_fails.store(0, Ordering::Relaxed);
                tracing::info!(upstream = %self.cfg.name, backend = %b.addr, "backend healthy again");
            } else {
                self.marks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(upstream = %self.cfg.name, backend = %b.addr, "backend marked unhealthy by health checks");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Keep-alive pool

/// Bookkeeping for one upstream connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnMeta {
    pub created: Instant,
    /// Requests completed on this connection.
    pub requests: u32,
}

/// What a runtime sees when it looks at an idle pooled connection without consuming
/// anything (a non-blocking `recv` with `MSG_PEEK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Nothing to read and not closed: it may carry the next request.
    Quiet,
    /// Bytes arrived while it sat idle: the backend sent more than its last response
    /// declared, or something nobody asked for. Those bytes would be read as the next
    /// request's response, so the connection is never reused.
    Unread,
    /// The backend closed it (FIN or reset), or the socket failed.
    Closed,
}

struct Idle<C> {
    conn: C,
    meta: ConnMeta,
    since: Instant,
}

/// Idle upstream connections of one worker, per backend. `C` is the runtime's connection
/// (a socket, or a token for one); the pool decides what to keep, reuse and expire.
///
/// The rule that keeps responses with their requests lives here, whatever the runtime: a
/// connection is handed out only after the runtime's probe found it [`Liveness::Quiet`]
/// at that moment, and one that turns readable while idle goes at once
/// ([`on_idle_readable`](Self::on_idle_readable)) or at the next
/// [`sweep`](Self::sweep), for runtimes that do not watch idle sockets.
pub struct Pool<C> {
    cfg: PoolConfig,
    per_backend: Vec<VecDeque<Idle<C>>>,
    metrics: Arc<crate::metrics::Metrics>,
    unread_log: crate::metrics::Throttle,
}

impl<C> Pool<C> {
    pub fn new(backends: usize, cfg: PoolConfig, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Pool {
            cfg,
            per_backend: (0..backends).map(|_| VecDeque::new()).collect(),
            metrics,
            unread_log: crate::metrics::Throttle::new(Duration::from_secs(10)),
        }
    }

    /// One pool per upstream of `ctx` (a worker's set).
    pub fn for_each_upstream(ctx: &crate::proxy::ProxyContext) -> Vec<Pool<C>> {
        ctx.upstreams
            .iter()
            .map(|u| Pool::new(u.backends.len(), u.cfg.pool.clone(), ctx.metrics.clone()))
            .collect()
    }

    fn usable(cfg: &PoolConfig, meta: &ConnMeta, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) < cfg.idle_timeout && Self::young(cfg, meta, now)
    }

    /// Within `max_requests` and `max_lifetime` (the idle time aside: a connection just
    /// released has none).
    #[inline]
    fn young(cfg: &PoolConfig, meta: &ConnMeta, now: Instant) -> bool {
        meta.requests < cfg.max_requests
            && now.saturating_duration_since(meta.created) < cfg.max_lifetime
    }

    /// Count (and log, throttled) an idle connection found readable.
    fn note(&mut self, why: Liveness, backend: usize, now: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        match why {
            Liveness::Quiet => {}
            Liveness::Closed => {
                self.metrics.upstream_idle_closed.fetch_add(1, Relaxed);
            }
            Liveness::Unread => {
                self.metrics.upstream_idle_unread.fetch_add(1, Relaxed);
                if let Some(more) = self.unread_log.hit(now) {
                    tracing::warn!(
                        backend,
                        more,
                        "backend sent bytes on an idle keep-alive connection (more than its \
                         response declared, or unasked); connection closed, never reused"
                    );
                }
            }
        }
    }

    /// The most recently used idle connection to `backend` that is within its limits and
    /// that `probe` finds [`Liveness::Quiet`] now. Every other candidate met on the way is
    /// handed to `discard` (the runtime closes it).
    pub fn take(
        &mut self,
        backend: usize,
        now: Instant,
        mut probe: impl FnMut(&C) -> Liveness,
        mut discard: impl FnMut(C),
    ) -> Option<(C, ConnMeta)> {
        loop {
            let idle = self.per_backend.get_mut(backend)?.pop_back()?;
            if !Self::usable(&self.cfg, &idle.meta, idle.since, now) {
                discard(idle.conn);
                continue;
            }
            match probe(&idle.conn) {
                Liveness::Quiet => return Some((idle.conn, idle.meta)),
                why => {
                    self.note(why, backend, now);
                    discard(idle.conn);
                }
            }
        }
    }

    /// Offer a connection whose last exchange completed cleanly. Returns it back when it
    /// must not be kept (pool full, disabled, or past its request or lifetime limit).
    /// A session released `conn` after a completed exchange on it (`reusable`: the
    /// session says it may carry another; the runtime's own checks, such as a write still
    /// in flight or a closed read side, are folded in by the caller). It counts the
    /// request and goes back to the pool if it may; else, or when the pool refuses it
    /// (full, past its lifetime or request limit), it is handed back to be closed.
    pub fn release(
        &mut self,
        backend: usize,
        conn: C,
        mut meta: ConnMeta,
        reusable: bool,
        now: Instant,
    ) -> Option<C> {
        meta.requests = meta.requests.saturating_add(1);
        if !reusable {
            return Some(conn);
        }
        self.put(backend, conn, meta, now)
    }

    pub fn put(&mut self, backend: usize, conn: C, meta: ConnMeta, now: Instant) -> Option<C> {
        if !self.cfg.enabled
            || self.cfg.idle_timeout.is_zero()
            || !Self::young(&self.cfg, &meta, now)
        {
            return Some(conn);
        }
        let Some(q) = self.per_backend.get_mut(backend) else {
            return Some(conn);
        };
        if q.len() >= self.cfg.max_idle {
            return Some(conn);
        }
        q.push_back(Idle {
            conn,
            meta,
            since: now,
        });
        None
    }

    /// The runtime saw an idle connection turn readable: `probe` it, and when it holds
    /// bytes or was closed, take it out of the pool (returned, for the runtime to close).
    /// A spurious wake-up ([`Liveness::Quiet`]) leaves it pooled.
    pub fn on_idle_readable(
        &mut self,
        backend: usize,
        now: Instant,
        mut is_it: impl FnMut(&C) -> bool,
        probe: impl FnOnce(&C) -> Liveness,
    ) -> Option<C> {
        let q = self.per_backend.get_mut(backend)?;
        let pos = q.iter().position(|i| is_it(&i.conn))?;
        let why = probe(&q[pos].conn);
        if why == Liveness::Quiet {
            return None;
        }
        let conn = q.remove(pos).map(|i| i.conn)?;
        self.note(why, backend, now);
        Some(conn)
    }

    /// Close idle connections past their idle timeout or lifetime.
    pub fn evict_expired(&mut self, now: Instant, mut discard: impl FnMut(C)) {
        for q in &mut self.per_backend {
            // Oldest first: idle connections are pushed at the back.
            while let Some(front) = q.front() {
                if Self::usable(&self.cfg, &front.meta, front.since, now) {
                    break;
                }
                if let Some(i) = q.pop_front() {
                    discard(i.conn);
                }
            }
        }
    }

    /// [`evict_expired`](Self::evict_expired), then probe every idle connection and close
    /// those the backend closed or wrote to: for runtimes that keep no read armed on idle
    /// sockets, so such connections do not linger (they are never handed out either way).
    pub fn sweep(
        &mut self,
        now: Instant,
        mut probe: impl FnMut(&C) -> Liveness,
        mut discard: impl FnMut(C),
    ) {
        self.evict_expired(now, &mut discard);
        for b in 0..self.per_backend.len() {
            let mut i = 0;
            while i < self.per_backend[b].len() {
                let why = probe(&self.per_backend[b][i].conn);
                if why == Liveness::Quiet {
                    i += 1;
                    continue;
                }
                self.note(why, b, now);
                if let Some(idle) = self.per_backend[b].remove(i) {
                    discard(idle.conn);
                }
            }
        }
    }

    /// When the next idle connection expires (for the runtime's timer).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.per_backend
            .iter()
            .filter_map(|q| q.front().map(|i| i.since + self.cfg.idle_timeout))
            .min()
    }

    pub fn idle_count(&self) -> usize {
        self.per_backend.iter().map(|q| q.len()).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Active health checks

/// A probe the runtime should run now: connect to `addr`, write `request`, read until
/// [`crate::http1::head::probe_status`] completes, all within `timeout`, then report back.
#[derive(Clone, Debug)]
pub struct Probe {
    pub backend: usize,
    pub addr: SocketAddr,
    pub timeout: Duration,
}

struct ProbeState {
    next_at: Instant,
    in_flight: bool,
    ok_streak: u32,
    fail_streak: u32,
}

/// Drives active probes for one upstream. One instance per upstream per process.
pub struct HealthChecker {
    pub upstream: Arc<Upstream>,
    cfg: ActiveHealth,
    probes: Vec<ProbeState>,
    requests: Vec<Vec<u8>>,
}

impl HealthChecker {
    pub fn new(upstream: Arc<Upstream>, cfg: ActiveHealth, now: Instant) -> Self {
        let n = upstream.backends.len();
        let requests = upstream
            .backends
            .iter()
            .map(|b| {
                format!(
                    "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: trireme-health-check\r\nConnection: close\r\n\r\n",
                    cfg.path, b.host
                )
                .into_bytes()
            })
            .collect();
        HealthChecker {
            upstream,
            probes: (0..n)
                .map(|_| ProbeState {
                    next_at: now,
                    in_flight: false,
                    ok_streak: 0,
                    fail_streak: 0,
                })
                .collect(),
            cfg,
            requests,
        }
    }

    /// The next probe due at `now`, if any. Marks it in flight.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Probe> {
        let (i, p) = self
            .probes
            .iter_mut()
            .enumerate()
            .find(|(_, p)| !p.in_flight && p.next_at <= now)?;
        p.in_flight = true;
        Some(Probe {
            backend: i,
            addr: self.upstream.backends[i].addr,
            timeout: self.cfg.timeout,
        })
    }

    pub fn request(&self, backend: usize) -> &[u8] {
        &self.requests[backend]
    }

    /// Report a probe: `Some(status)` when a status line arrived, `None` on connect error,
    /// timeout or garbage.
    pub fn on_result(&mut self, backend: usize, status: Option<u16>, now: Instant) {
        let Some(p) = self.probes.get_mut(backend) else {
            return;
        };
        p.in_flight = false;
        p.next_at = now + self.cfg.interval;
        let (lo, hi) = self.cfg.expected_status;
        let ok = status.is_some_and(|s| s >= lo && s <= hi);
        let healthy_now = self.upstream.backends[backend].is_healthy();
        if ok {
            p.fail_streak = 0;
            p.ok_streak += 1;
            if !healthy_now && p.ok_streak >= self.cfg.healthy_threshold {
                self.upstream.set_healthy(backend, true);
            }
        } else {
            p.ok_streak = 0;
            p.fail_streak += 1;
            if healthy_now && p.fail_streak >= self.cfg.unhealthy_threshold {
                self.upstream.set_healthy(backend, false);
            }
        }
    }

    /// When [`poll_probe`](Self::poll_probe) will next have something.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.probes
            .iter()
            .filter(|p| !p.in_flight)
            .map(|p| p.next_at)
            .min()
    }
}

/// Every upstream's active health checks, run by one worker of the runtime (its event
/// loop carries out the probes; no thread per probe): probes come out as [`ProbeRun`]s named
/// by a [`ProbeId`]; their verdicts go back with [`Health::on_result`].
pub struct Health {
    checkers: Vec<HealthChecker>,
}

/// Which checker and backend a probe is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeId {
    checker: u16,
    backend: u16,
}

impl Health {
    /// The checks of every upstream of `ctx` with `health_check` configured.
    pub fn for_context(ctx: &crate::proxy::ProxyContext, now: Instant) -> Self {
        Health {
            checkers: ctx
                .upstreams
                .iter()
                .filter_map(|up| {
                    let cfg = up.cfg.active.clone()?;
                    Some(HealthChecker::new(up.clone(), cfg, now))
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.checkers.is_empty()
    }

    /// The next probe due at `now`, if any (marked in flight until its result).
    pub fn poll_probe(&mut self, now: Instant) -> Option<ProbeRun> {
        self.checkers.iter_mut().enumerate().find_map(|(c, hc)| {
            let p = hc.poll_probe(now)?;
            Some(ProbeRun {
                id: ProbeId {
                    checker: c as u16,
                    backend: p.backend as u16,
                },
                addr: p.addr,
                deadline: now + p.timeout,
                request: hc.request(p.backend).to_vec(),
                written: 0,
                got: Vec::new(),
            })
        })
    }

    /// A probe's verdict: `Some(status)` when a status line arrived, `None` on a connect
    /// error, a timeout or garbage.
    pub fn on_result(&mut self, id: ProbeId, status: Option<u16>, now: Instant) {
        if let Some(hc) = self.checkers.get_mut(id.checker as usize) {
            hc.on_result(id.backend as usize, status, now);
        }
    }

    /// When [`poll_probe`](Self::poll_probe) will next have something.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.checkers
            .iter()
            .filter_map(HealthChecker::next_deadline)
            .min()
    }
}

/// One probe in flight: connect to `addr`, write the request, read until the status line
/// decides it, all before `deadline` (else its verdict is `None`). The runtime moves the
/// bytes; the probe says when it is decided.
#[derive(Debug)]
pub struct ProbeRun {
    pub id: ProbeId,
    pub addr: SocketAddr,
    pub deadline: Instant,
    request: Vec<u8>,
    written: usize,
    got: Vec<u8>,
}

impl ProbeRun {
    /// Request bytes still to write.
    pub fn pending(&self) -> &[u8] {
        &self.request[self.written.min(self.request.len())..]
    }

    pub fn wrote(&mut self, n: usize) {
        self.written += n;
    }

    /// Bytes read from the backend: the verdict once the status line decides it (the
    /// status, or `None` for garbage).
    pub fn on_read(&mut self, data: &[u8]) -> Option<Option<u16>> {
        self.got.extend_from_slice(data);
        match crate::http1::head::probe_status(&self.got) {
            crate::http1::Parsed::Complete(r) => Some(r.ok()),
            crate::http1::Parsed::Partial => None,
        }
    }
}

/// One request's way through an upstream's backends, the rules every exchange with an
/// origin follows, whoever makes it (a client's request in the session, a refresh or warming
/// fetch in [`crate::background`]): each attempt's backend is picked like any request's
/// (skipping those already tried and those at `max_conns`) and counted in flight
/// (least_conn, `max_conns`) until it ends; each outcome goes to passive health; a failed
/// attempt may be retried on another backend within the upstream's `retries`; and a pooled
/// connection found closed is retried once on the same backend, on a fresh connection,
/// outside that budget.
///
/// It holds no reference to the upstream (a session reaches its upstreams through its
/// context, and a per-request `Arc` clone would bounce one counter between every worker):
/// each call takes the `Upstream` it is about, always the same one. [`Attempts`] owns one
/// for callers that want the upstream held and the attempt ended on drop.
#[derive(Debug, Default)]
pub struct AttemptState {
    tried: smallvec::SmallVec<[u16; 4]>,
    retries_left: u32,
    /// The backend whose in-flight slot this request holds.
    current: Option<u16>,
    /// The backend of the latest attempt (kept after its slot is given back).
    last: Option<u16>,
    stale_retry_used: bool,
}

impl AttemptState {
    pub fn new(up: &Upstream) -> Self {
        AttemptState {
            retries_left: up.cfg.retries,
            ..AttemptState::default()
        }
    }

    /// The backend whose in-flight slot is held.
    #[inline]
    pub fn current(&self) -> Option<usize> {
        self.current.map(usize::from)
    }

    /// The backend of the latest attempt, in flight or not.
    #[inline]
    pub fn last(&self) -> Option<usize> {
        self.last.map(usize::from)
    }

    /// Start the next attempt: the backend to use, or none left (none healthy, all tried
    /// or at `max_conns`; one taken meanwhile by another worker is skipped). Ends an
    /// attempt still in flight first.
    pub fn begin(&mut self, up: &Upstream, input: &PickInput<'_>, now: Instant) -> Option<usize> {
        self.end(up);
        let mut b = up.pick(input, &self.tried, now)?;
        if !up.try_begin(b) {
            // Taken meanwhile by another worker: skipped for the next picks (rare; the
            // list of those to skip is copied only then).
            let mut skip = self.tried.clone();
            loop {
                skip.push(b as u16);
                b = up.pick(input, &skip, now)?;
                if up.try_begin(b) {
                    break;
                }
            }
        }
        self.tried.push(b as u16);
        self.current = Some(b as u16);
        self.last = Some(b as u16);
        Some(b)
    }

    /// The pooled connection of the latest attempt was found closed before a byte of
    /// response: the same backend again (on a fresh connection, the caller's part), once
    /// per request and outside the retry budget (not the backend's fault). `None` when
    /// it was used already, or the backend is at `max_conns` now.
    pub fn again_on_fresh(&mut self, up: &Upstream) -> Option<usize> {
        self.end(up);
        let b = self.last?;
        if self.stale_retry_used || !up.try_begin(usize::from(b)) {
            return None;
        }
        self.stale_retry_used = true;
        self.current = Some(b);
        Some(usize::from(b))
    }

    /// Whether the stale-connection retry ([`again_on_fresh`](Self::again_on_fresh)) was
    /// used already.
    pub fn stale_retry_used(&self) -> bool {
        self.stale_retry_used
    }

    /// Take one retry from the budget (counted in `trireme_retries_total`); false when it
    /// is spent.
    pub fn take_retry(&mut self, metrics: &crate::metrics::Metrics) -> bool {
        if self.retries_left == 0 {
            return false;
        }
        self.retries_left -= 1;
        metrics.retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether a retry is left in the budget.
    pub fn may_retry(&self) -> bool {
        self.retries_left > 0
    }

    /// The attempt failed (before any response, or its response was broken): counted
    /// against its backend. The attempt stays in flight until [`end`](Self::end).
    pub fn report_failure(&self, up: &Upstream, now: Instant) {
        if let Some(b) = self.current {
            up.report_failure(usize::from(b), now);
        }
    }

    /// The attempt got a response head with `status`: a 5xx counts against the backend
    /// when passive health says so, anything else clears its failures. The attempt stays in
    /// flight until [`end`](Self::end) (its body is still to come).
    pub fn report_status(&self, up: &Upstream, status: u16, now: Instant) {
        if let Some(b) = self.current {
            if status >= 500 && up.cfg.passive.on_5xx {
                up.report_failure(usize::from(b), now);
            } else {
                up.report_success(usize::from(b));
            }
        }
    }

    /// Give back the in-flight slot of the attempt: the backend it was on, if one was held.
    pub fn end(&mut self, up: &Upstream) -> Option<usize> {
        let b = self.current.take()?;
        up.end(usize::from(b));
        Some(usize::from(b))
    }

    /// The attempt failed before any response (connect failure or timeout, a connection
    /// closed or reset before a byte): counted against its backend and ended. True when
    /// another attempt may follow (`retryable`, and the budget allows one: counted as a
    /// retry).
    pub fn failed(
        &mut self,
        up: &Upstream,
        retryable: bool,
        now: Instant,
        metrics: &crate::metrics::Metrics,
    ) -> bool {
        self.report_failure(up, now);
        self.end(up);
        retryable && self.take_retry(metrics)
    }
}

/// An [`AttemptState`] with its upstream held, for exchanges made without a client session
/// (cache refreshes and warming). Dropping it ends an attempt still in flight.
pub struct Attempts {
    upstream: Arc<Upstream>,
    state: AttemptState,
}

impl Attempts {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Attempts {
            state: AttemptState::new(&upstream),
            upstream,
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// See [`AttemptState::begin`].
    pub fn begin(&mut self, input: &PickInput<'_>, now: Instant) -> Option<usize> {
        self.state.begin(&self.upstream, input, now)
    }

    /// See [`AttemptState::failed`] (always retryable: a background fetch is a GET).
    pub fn failed(&mut self, now: Instant, metrics: &crate::metrics::Metrics) -> bool {
        self.state.failed(&self.upstream, true, now, metrics)
    }

    /// The attempt got a response with `status` (passive health as
    /// [`AttemptState::report_status`]); the attempt ends.
    pub fn answered(&mut self, status: u16, now: Instant) {
        self.state.report_status(&self.upstream, status, now);
        self.state.end(&self.upstream);
    }

    /// The attempt's response was broken or cut off: counted against its backend, not
    /// retried (the backend has seen the request). The attempt ends.
    pub fn broken(&mut self, now: Instant) {
        self.state.report_failure(&self.upstream, now);
        self.state.end(&self.upstream);
    }
}

impl Drop for Attempts {
    fn drop(&mut self) {
        self.state.end(&self.upstream);
    }
}

#[cfg(test)]
mod tests;
