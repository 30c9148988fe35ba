//! trireme on mio (epoll), thread per core.
//!
//! Each worker thread owns a `mio::Poll`, its own `SO_REUSEPORT` listener, a slab of client
//! connections, a slab of upstream sockets, one keep-alive pool per upstream and a timer
//! heap fed by the sessions' deadlines. Nothing is shared between workers but the proxy
//! context (backend health and load counters, metrics: atomics) and the connection count.
//!
//! Readiness is edge-triggered. A socket's `readable` / `writable` flags stay set until a
//! read or write comes up short, so the loop never asks the kernel twice for the same
//! news: a short read means the receive queue was drained (unless the peer already closed,
//! which `EPOLLRDHUP` tells), a short write means the send queue is full.
//!
//! Every decision (parsing, routing, picking, retrying, deadlines) is the session's
//! ([`trireme_core::proxy::Session`]); this file moves bytes and keeps time.

#![deny(clippy::print_stdout, clippy::print_stderr)]

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use trireme_core::admission::{IdleList, IdleSlot, IpSlot};
use trireme_core::background::{Background, End, Run};
use trireme_core::buf::BufPool;
use trireme_core::config::RunOptions;
use trireme_core::driver::{Admit, Gate, TimerSlot, POOL_SWEEP_EVERY};
use trireme_core::proxy::{Action, IoId, ProxyContext, Session};
use trireme_core::shutdown::Shutdown;
use trireme_core::upstream::{ConnMeta, Pool};
use trireme_core::wake::{TokenQueue, Wake, Waker as CoreWaker};
use trireme_rt_support::{peek_idle, read_spare, AdminListener, Listeners};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const ADMIN_LISTENER: Token = Token(usize::MAX - 3);

/// Client connection `k` has token `4k`; upstream socket `u` `4u + 1`; background run `p`
/// (health probe, cache fetch) `4p + 2`.
fn client_token(k: usize) -> Token {
    Token(k << 2)
}
fn upstream_token(u: usize) -> Token {
    Token((u << 2) | 1)
}
fn run_token(p: usize) -> Token {
    Token((p << 2) | 2)
}

/// Wake-ups for this worker's sessions, from any worker (core's [`Wake`]): a session
/// waiting on another request's fetch is named by its token (slab key and generation); the
/// tokens queue here and the worker's poll is woken.
struct Wakeups {
    queue: TokenQueue,
    waker: Arc<Waker>,
}

impl Wake for Wakeups {
    fn wake(&self, token: u64) {
        if self.queue.push(token) {
            let _ = self.waker.wake();
        }
    }
}

fn wake_token(k: usize, gen: u32) -> u64 {
    ((k as u64) << 32) | gen as u64
}

struct Shared {
    ctx: Arc<ProxyContext>,
    opts: RunOptions,
    /// Client connections open, over all workers (for `max_connections`).
    active: AtomicUsize,
}

/// Run the proxy, one worker thread per listener, until `shutdown` is requested; then
/// drain (bounded by `opts.drain_timeout`). Blocks the calling thread.
pub fn run(
    ctx: Arc<ProxyContext>,
    opts: RunOptions,
    listeners: Listeners,
    shutdown: Arc<Shutdown>,
) -> io::Result<()> {
    let Listeners { proxy, mut admin } = listeners;
    let sh = Arc::new(Shared {
        ctx,
        opts,
        active: AtomicUsize::new(0),
    });
    let mut threads = Vec::new();
    for (id, l) in proxy.into_iter().enumerate() {
        let w = Worker::new(id, sh.clone(), l, admin.take(), shutdown.clone())?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("trireme-worker-{id}"))
                .spawn(move || w.run())?,
        );
    }
    trireme_rt_support::join_workers(threads)
}

struct Conn {
    stream: TcpStream,
    s: Session,
    /// The upstream socket this session uses (a key into `Io::ups`).
    up: Option<usize>,
    readable: bool,
    read_closed: bool,
    writable: bool,
    /// The earliest deadline with an entry in the timer heap.
    timer: TimerSlot,
    /// Tells this connection's timer entries from those of an earlier one in the same slot.
    gen: u32,
    /// Its place among the worker's idle connections, while it waits for a request.
    idle: Option<IdleSlot>,
    /// Counted against `max_connections_per_ip` while open.
    _ip: Option<IpSlot>,
    /// On the admin listener (not counted against `max_connections`).
    admin: bool,
}

struct Up {
    stream: TcpStream,
    /// The client connection using it; `None` while idle in the pool.
    owner: Option<usize>,
    /// The owner's name for this I/O (from its `Connect`).
    io: IoId,
    upstream: u16,
    backend: u16,
    meta: ConnMeta,
    connecting: bool,
    readable: bool,
    read_closed: bool,
    writable: bool,
}

/// A worker's upstream side: sockets, pools, and the registry to add new ones to.
struct Io {
    registry: Registry,
    bufs: BufPool,
    ups: Slab<Up>,
    /// Idle connections by slab key, with their descriptor for the liveness probe.
    pools: Vec<Pool<(usize, RawFd)>>,
    /// Client connections waiting for a request, by slab key (oldest first).
    idle: IdleList<usize>,
}

impl Io {
    fn close_up(&mut self, u: usize) {
        // Dropping the socket closes it, which also removes it from the epoll set.
        self.ups.try_remove(u);
    }

    /// An idle pooled connection to `backend`, checked by core's pool: one with unread
    /// bytes or a closed peer is never handed out (it is closed instead).
    fn take_pooled(&mut self, upstream: u16, backend: u16, now: Instant) -> Option<usize> {
        let Io { ups, pools, .. } = self;
        let ((u, _), meta) = pools[upstream as usize].take(
            backend as usize,
            now,
            |&(_, fd)| peek_idle(fd),
            |(u, _)| {
                ups.try_remove(u);
            },
        )?;
        let up = &mut ups[u];
        // The peek found nothing to read: any readiness flag left over is stale.
        up.readable = false;
        up.meta = meta;
        Some(u)
    }
}

struct Worker {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    /// The admin listener and its sessions' context (worker 0).
    admin: Option<(TcpListener, Arc<ProxyContext>)>,
    /// When accepting failed for lack of file descriptors: retry at this time.
    accept_retry: Option<Instant>,
    conns: Slab<Conn>,
    io: Io,
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    next_gen: u32,
    next_evict: Instant,
    sh: Arc<Shared>,
    shutdown: Arc<Shutdown>,
    wakeups: Arc<Wakeups>,
    /// The tokens of the last batch of wake-ups (a buffer kept for the next one).
    woken: Vec<u64>,
    drain_until: Option<Instant>,
    gate: Gate,
    /// Background exchanges (health probes, cache refreshes and warming): worker 0 runs
    /// them for the process, each run a socket on this loop.
    bg: Option<Background>,
    runs: Slab<BgConn>,
    /// When `bg` has a probe due next, and whether it must be asked before that (woken: a
    /// fetch may be queued; a run ended): the loop asks it only then, not every turn.
    bg_next: Option<Instant>,
    bg_ask: bool,
}

/// A background run in flight on this worker's loop.
struct BgConn {
    stream: TcpStream,
    run: Run,
    connected: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}
fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

impl Worker {
    fn new(
        id: usize,
        sh: Arc<Shared>,
        listener: std::net::TcpListener,
        admin: Option<AdminListener>,
        shutdown: Arc<Shutdown>,
    ) -> io::Result<Worker> {
        let poll = Poll::new()?;
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let admin = match admin {
            Some(a) => {
                a.listener.set_nonblocking(true)?;
                let mut l = TcpListener::from_std(a.listener);
                poll.registry()
                    .register(&mut l, ADMIN_LISTENER, Interest::READABLE)?;
                Some((l, a.ctx))
            }
            None => None,
        };
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let w2 = waker.clone();
        shutdown.on_request(move || {
            let _ = w2.wake();
        });
        let pools = Pool::for_each_upstream(&sh.ctx);
        // Worker 0 runs the process's background exchanges on its loop; a queued fetch
        // wakes its poll (from any thread).
        let bg = (id == 0)
            .then(|| Background::new(&sh.ctx, sh.opts.refresh_concurrency, Instant::now()))
            .filter(|b| !b.is_empty());
        if let (Some(_), Some(cache)) = (&bg, &sh.ctx.cache) {
            let w = waker.clone();
            cache.set_refresher(move || {
                let _ = w.wake();
            });
        }
        Ok(Worker {
            id,
            io: Io {
                registry: poll.registry().try_clone()?,
                bufs: BufPool::default(),
                ups: Slab::new(),
                pools,
                idle: IdleList::default(),
            },
            poll,
            listener: Some(listener),
            admin,
            accept_retry: None,
            conns: Slab::new(),
            timers: BinaryHeap::new(),
            next_gen: 0,
            next_evict: Instant::now() + POOL_SWEEP_EVERY,
            gate: Gate::new(
                sh.ctx.per_ip.clone(),
                sh.opts.max_connections,
                sh.ctx.metrics.clone(),
            ),
            sh,
            shutdown,
            woken: Vec::new(),
            wakeups: Arc::new(Wakeups {
                queue: TokenQueue::default(),
                waker,
            }),
            drain_until: None,
            bg,
            runs: Slab::new(),
            bg_next: None,
            bg_ask: true,
        })
    }

    /// The event loop. Returns the number of connections still open when the drain
    /// timeout cut them off.
    fn run(mut self) -> io::Result<usize> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if self.drain_until.is_none() && self.shutdown.is_requested() {
                self.begin_drain(now);
            }
            if let Some(until) = self.drain_until {
                if self.conns.is_empty() {
                    return Ok(0);
                }
                if now >= until {
                    let left = self.conns.len();
                    for c in self.conns.drain() {
                        if !c.admin {
                            self.sh.active.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    return Ok(left);
                }
            }
            let timeout = self
                .next_wake(now)
                .map(|t| t.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(now),
                    ADMIN_LISTENER => self.accept_admin(now),
                    WAKER => {
                        self.bg_ask = true;
                        self.deliver_wakeups(now);
                    }
                    Token(t) if t & 3 == 0 => {
                        let k = t >> 2;
                        if let Some(c) = self.conns.get_mut(k) {
                            c.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                            c.read_closed |= ev.is_read_closed();
                            c.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                            self.drive(k, now);
                        }
                    }
                    Token(t) if t & 3 == 1 => self.upstream_event(t >> 2, ev, now),
                    Token(t) => self.run_event(t >> 2, ev, now),
                }
            }
            self.fire_timers(now);
            self.run_background(now);
            if self.accept_retry.is_some_and(|t| t <= now) {
                self.accept_retry = None;
                self.accept(now);
            }
            if now >= self.next_evict {
                self.next_evict = now + POOL_SWEEP_EVERY;
                let Io { ups, pools, .. } = &mut self.io;
                for p in pools.iter_mut() {
                    p.evict_expired(now, |(u, _)| {
                        ups.try_remove(u);
                    });
                }
            }
        }
    }

    /// Sessions woken by a fetch they wait on (see [`Wakeups`]): tell each, if it is
    /// still the connection the token named.
    fn deliver_wakeups(&mut self, now: Instant) {
        let mut tokens = std::mem::take(&mut self.woken);
        self.wakeups.queue.take_into(&mut tokens);
        for &t in &tokens {
            let (k, gen) = ((t >> 32) as usize, t as u32);
            if let Some(c) = self.conns.get_mut(k).filter(|c| c.gen == gen) {
                c.s.on_wake(now);
                self.drive(k, now);
            }
        }
        self.woken = tokens;
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let mut t = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let probes = self.runs.iter().map(|(_, p)| p.run.deadline).min();
        let bg_on = self.bg.is_some() && self.drain_until.is_none();
        // Background work to look at now (woken, a run ended): no wait.
        let asked = (bg_on && self.bg_ask).then_some(now);
        let health = self.bg_next.filter(|_| bg_on);
        for o in [
            self.accept_retry,
            self.drain_until,
            Some(self.next_evict),
            probes,
            health,
            asked,
        ]
        .into_iter()
        .flatten()
        {
            t = Some(t.map_or(o, |t| t.min(o)));
        }
        t.map(|t| t.max(now))
    }

    fn begin_drain(&mut self, now: Instant) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some((mut l, _)) = self.admin.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_retry = None;
        self.drain_until = Some(now + self.sh.opts.drain_timeout);
        if self.id == 0 {
            tracing::info!(
                connections = self.sh.active.load(Ordering::Relaxed),
                timeout_secs = self.sh.opts.drain_timeout.as_secs_f64(),
                "shutting down: stopped accepting, draining"
            );
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            // Read first: a request that reached the socket before the drain is served
            // (with `Connection: close`) rather than cut off with the idle connection.
            if let Some(c) = self.conns.get_mut(k) {
                c.readable = true;
            }
            self.drive(k, now);
            if let Some(c) = self.conns.get_mut(k) {
                c.s.begin_drain(now);
            }
            self.drive(k, now);
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(l) = &self.listener else { return };
            let (stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => continue,
                Err(e) => {
                    // The connection waits in the backlog (edge-triggered: no new event
                    // would come): core's back-off says when to try again.
                    self.accept_retry = Some(self.gate.accept_failed(&e, now));
                    return;
                }
            };
            let Io { idle, .. } = &mut self.io;
            let open = self.sh.active.load(Ordering::Relaxed);
            let ip_slot = match self.gate.admit(peer, open, || idle.pop_oldest(), now) {
                Admit::Refuse => continue,
                Admit::Open { ip, evicted } => {
                    if let Some(old) = evicted {
                        // Make room: the connection idle the longest goes.
                        if let Some(c) = self.conns.get_mut(old) {
                            c.idle = None;
                        }
                        self.close_conn(old);
                    }
                    ip
                }
            };
            let ctx = self.sh.ctx.clone();
            if self.open_conn(stream, peer, ctx, ip_slot, false, now) {
                self.sh.active.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Connections on the admin listener: sessions of its context, bounded by core
    /// (`admin.max_connections`), not by the proxy's gate.
    fn accept_admin(&mut self, now: Instant) {
        loop {
            let Some((l, ctx)) = &self.admin else { return };
            let ctx = ctx.clone();
            match l.accept() {
                Ok((stream, peer)) => {
                    self.open_conn(stream, peer, ctx, None, true, now);
                }
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => continue,
                Err(e) => {
                    // Left in the backlog until the next readiness (the admin listener
                    // takes no part in the proxy's accept back-off).
                    tracing::warn!(error = %e, "admin accept failed");
                    return;
                }
            }
        }
    }

    /// Register an accepted connection and start its session. False if it could not be
    /// registered (it is closed).
    fn open_conn(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        ctx: Arc<ProxyContext>,
        ip_slot: Option<IpSlot>,
        admin: bool,
        now: Instant,
    ) -> bool {
        let _ = stream.set_nodelay(true);
        let e = self.conns.vacant_entry();
        let k = e.key();
        if let Err(err) = self.poll.registry().register(
            &mut stream,
            client_token(k),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %err, "cannot register connection");
            return false;
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let may_wait = ctx.sessions_may_wait();
        let mut s = Session::new(ctx, peer, now);
        if may_wait {
            let target: Arc<dyn Wake> = self.wakeups.clone();
            s.set_waker(CoreWaker::new(target, wake_token(k, self.next_gen)));
        }
        e.insert(Conn {
            stream,
            s,
            up: None,
            readable: false,
            read_closed: false,
            writable: true,
            timer: TimerSlot::default(),
            gen: self.next_gen,
            idle: None,
            _ip: ip_slot,
            admin,
        });
        if self.drain_until.is_some() {
            self.conns[k].s.begin_drain(now);
        }
        self.drive(k, now);
        true
    }

    /// Start the background runs that are due or queued (not while draining) and give up
    /// those past their deadline.
    fn run_background(&mut self, now: Instant) {
        if self.bg.is_none() {
            return;
        }
        if !self.runs.is_empty() {
            let late: Vec<usize> = self
                .runs
                .iter()
                .filter(|(_, p)| p.run.deadline <= now)
                .map(|(k, _)| k)
                .collect();
            for k in late {
                self.run_done(k, End::Failed, now);
            }
        }
        if self.drain_until.is_some() {
            return;
        }
        if !self.bg_ask && self.bg_next.is_none_or(|t| t > now) {
            return;
        }
        if self.bg_ask {
            // Work queued: a run that keeps its connection (the L2 writer) may take it.
            let keys: Vec<usize> = self.runs.iter().map(|(k, _)| k).collect();
            for k in keys {
                let more = self
                    .runs
                    .get_mut(k)
                    .is_some_and(|p| p.connected && p.run.refill(now));
                if more {
                    self.run_io(k, now);
                }
            }
        }
        self.bg_ask = false;
        while let Some(run) = self.bg.as_mut().and_then(|b| b.poll_run(now)) {
            self.start_run(run, now);
        }
        self.bg_next = self.bg.as_ref().and_then(Background::next_deadline);
    }

    fn start_run(&mut self, run: Run, now: Instant) {
        let e = self.runs.vacant_entry();
        let started = TcpStream::connect(run.addr).and_then(|mut stream| {
            self.poll.registry().register(
                &mut stream,
                run_token(e.key()),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match started {
            Ok(stream) => {
                e.insert(BgConn {
                    stream,
                    run,
                    connected: false,
                });
            }
            Err(_) => {
                let retry = self
                    .bg
                    .as_mut()
                    .and_then(|b| b.finish(run, End::Failed, now));
                if let Some(r) = retry {
                    self.start_run(r, now);
                }
            }
        }
    }

    /// Readiness on background run `k`: finish connecting, write the request, read.
    fn run_event(&mut self, k: usize, ev: &mio::event::Event, now: Instant) {
        let Some(p) = self.runs.get_mut(k) else {
            return;
        };
        if !p.connected {
            match p.stream.take_error() {
                Ok(None) => match p.stream.peer_addr() {
                    Ok(_) => p.connected = true,
                    Err(e) if e.kind() == io::ErrorKind::NotConnected && !ev.is_error() => return,
                    Err(_) => return self.run_done(k, End::Failed, now),
                },
                Ok(Some(_)) | Err(_) => return self.run_done(k, End::Failed, now),
            }
        }
        self.run_io(k, now);
    }

    /// Write what connected run `k` has, read what came; a run that has more to write after
    /// a read (a conversation: the L2 tier's) writes it, until the socket would block.
    fn run_io(&mut self, k: usize, now: Instant) {
        let Some(p) = self.runs.get_mut(k) else {
            return;
        };
        let mut chunk = [0u8; 16 * 1024];
        // The socket took no more: the rest goes when it is writable again (its edge), and
        // reading goes on meanwhile.
        let mut blocked = false;
        'io: loop {
            while !blocked && !p.run.pending().is_empty() {
                match (&p.stream).write(p.run.pending()) {
                    Ok(n) if n > 0 => p.run.wrote(n),
                    Err(e) if would_block(&e) => blocked = true,
                    Err(e) if interrupted(&e) => {}
                    _ => return self.run_done(k, End::Failed, now),
                }
            }
            loop {
                match (&p.stream).read(&mut chunk) {
                    Ok(0) => return self.run_done(k, End::Closed, now),
                    Ok(n) => {
                        if p.run.on_read(&chunk[..n], now) {
                            return self.run_done(k, End::Done, now);
                        }
                        if !blocked && !p.run.pending().is_empty() {
                            continue 'io;
                        }
                    }
                    Err(e) if would_block(&e) => return,
                    Err(e) if interrupted(&e) => {}
                    Err(_) => return self.run_done(k, End::Failed, now),
                }
            }
        }
    }

    fn run_done(&mut self, k: usize, end: End, now: Instant) {
        // Dropping the socket closes it (and takes it out of the epoll set).
        let Some(p) = self.runs.try_remove(k) else {
            return;
        };
        // The next probe's time moved; a fetch slot is free.
        self.bg_ask = true;
        let retry = self.bg.as_mut().and_then(|b| b.finish(p.run, end, now));
        if let Some(r) = retry {
            self.start_run(r, now);
        }
    }

    fn upstream_event(&mut self, u: usize, ev: &mio::event::Event, now: Instant) {
        let Some(up) = self.io.ups.get_mut(u) else {
            return;
        };
        up.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
        up.read_closed |= ev.is_read_closed();
        up.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
        let Some(k) = up.owner else {
            // Idle in the pool: the backend closed it or sent something unasked. Core's
            // pool checks and lets it go; it is closed at once.
            if up.readable {
                let (upstream, backend) = (up.upstream as usize, up.backend as usize);
                let fd = up.stream.as_raw_fd();
                let gone = self.io.pools[upstream].on_idle_readable(
                    backend,
                    now,
                    |&(x, _)| x == u,
                    |_| peek_idle(fd),
                );
                match gone {
                    Some((u, _)) => {
                        self.io.ups.remove(u);
                    }
                    None => self.io.ups[u].readable = false,
                }
            }
            return;
        };
        if up.connecting && (up.writable || up.readable) {
            let outcome = match up.stream.take_error() {
                Ok(None) => match up.stream.peer_addr() {
                    Ok(_) => Some(Ok(())),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
                    Err(e) => Some(Err(e)),
                },
                Ok(Some(e)) | Err(e) => Some(Err(e)),
            };
            match outcome {
                None => {
                    up.writable = false;
                    up.readable = false;
                    return;
                }
                Some(Ok(())) => {
                    up.connecting = false;
                    up.meta.created = now;
                    let io = up.io;
                    if let Some(c) = self.conns.get_mut(k) {
                        c.s.on_upstream_connected(io, false, now);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "upstream connect failed");
                    let io = self.io.ups.remove(u).io;
                    if let Some(c) = self.conns.get_mut(k) {
                        c.up = None;
                        c.s.on_upstream_connect_failed(io, now);
                    }
                }
            }
        }
        self.drive(k, now);
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, k, gen))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(k) else {
                continue;
            };
            if c.gen != gen || c.timer.armed() != Some(t) {
                continue; // a closed connection's entry, or superseded by an earlier one
            }
            c.timer.fire(&mut c.s, now);
            self.drive(k, now);
        }
    }

    /// Run connection `k` until it can make no more progress without new readiness: carry
    /// out the session's actions, write, read; then close it or arm its timer.
    fn drive(&mut self, k: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        let io = &mut self.io;
        loop {
            let mut progress = false;
            while let Some(a) = c.s.poll_action() {
                progress = true;
                match a {
                    Action::Connect {
                        io: up_io,
                        upstream,
                        backend,
                        addr,
                        fresh,
                    } => {
                        if let Some(u) = c.up.take() {
                            io.close_up(u);
                        }
                        let pooled = if fresh {
                            None
                        } else {
                            io.take_pooled(upstream, backend, now)
                        };
                        match pooled {
                            Some(u) => {
                                let up = &mut io.ups[u];
                                (up.owner, up.io) = (Some(k), up_io);
                                c.up = Some(u);
                                c.s.on_upstream_connected(up_io, true, now);
                            }
                            None => match connect(io, addr, upstream, backend, (k, up_io), now) {
                                Ok(u) => c.up = Some(u),
                                Err(e) => {
                                    tracing::debug!(error = %e, "upstream connect failed");
                                    c.s.on_upstream_connect_failed(up_io, now);
                                }
                            },
                        }
                    }
                    Action::ReleaseUpstream {
                        io: _,
                        upstream,
                        backend,
                        reuse,
                    } => {
                        let Some(u) = c.up.take() else { continue };
                        let up = &mut io.ups[u];
                        up.owner = None;
                        let reusable = reuse && !up.connecting && !up.read_closed;
                        let (meta, fd) = (up.meta, up.stream.as_raw_fd());
                        if let Some((r, _)) = io.pools[upstream as usize].release(
                            backend as usize,
                            (u, fd),
                            meta,
                            reusable,
                            now,
                        ) {
                            io.close_up(r);
                        }
                    }
                }
            }
            if c.s.wants_close() {
                break;
            }

            // Client: write, then read.
            if c.writable && c.s.has_client_output() {
                // The response head and bodies shared with read buffers or the cache:
                // one writev of the output's first segments.
                let out = c.s.client_output();
                let mut iov = [IoSlice::new(&[]); trireme_core::buf::WRITE_IOV];
                let parts = out.io_slices(&mut iov);
                let want: usize = iov[..parts].iter().map(|p| p.len()).sum();
                let written = if parts == 1 {
                    (&c.stream).write(&iov[0])
                } else {
                    (&c.stream).write_vectored(&iov[..parts])
                };
                match written {
                    Ok(n) if n > 0 => {
                        if n < want {
                            c.writable = false;
                        }
                        c.s.on_client_written(n, now);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => c.writable = false,
                    Err(e) if interrupted(&e) => progress = true,
                    _ => {
                        c.writable = false;
                        c.s.on_client_error(now);
                        progress = true;
                    }
                }
            }
            if c.readable && c.s.wants_client_read() {
                let fd = c.stream.as_raw_fd();
                match read_spare(fd, c.s.reserve_client_in(&mut io.bufs)) {
                    Ok((0, _)) => {
                        c.readable = false;
                        c.s.on_client_eof(now);
                    }
                    Ok((n, room)) => {
                        if n < room && !c.read_closed {
                            c.readable = false;
                        }
                        c.s.on_client_read(now);
                    }
                    Err(e) if would_block(&e) => c.readable = false,
                    Err(e) if interrupted(&e) => {}
                    Err(_) => {
                        c.readable = false;
                        c.s.on_client_error(now);
                    }
                }
                progress = true;
            }

            // Upstream: write, then read.
            if let Some(u) = c.up {
                let up = &mut io.ups[u];
                if !up.connecting && up.writable && c.s.has_upstream_output() {
                    let buf = c.s.upstream_output().pending();
                    match (&up.stream).write(buf) {
                        Ok(n) if n > 0 => {
                            if n < buf.len() {
                                up.writable = false;
                            }
                            c.s.on_upstream_written(up.io, n, now);
                        }
                        Err(e) if would_block(&e) => up.writable = false,
                        Err(e) if interrupted(&e) => {}
                        _ => {
                            up.writable = false;
                            c.s.on_upstream_eof(up.io, true, now);
                        }
                    }
                    progress = true;
                }
            }
            if let Some(u) = c.up {
                let up = &mut io.ups[u];
                if !up.connecting && up.readable && c.s.wants_upstream_read() {
                    let fd = up.stream.as_raw_fd();
                    match read_spare(fd, c.s.reserve_up_in(&mut io.bufs)) {
                        Ok((0, _)) => {
                            up.readable = false;
                            up.read_closed = true;
                            c.s.on_upstream_eof(up.io, false, now);
                        }
                        Ok((n, room)) => {
                            if n < room && !up.read_closed {
                                up.readable = false;
                            }
                            c.s.on_upstream_read(up.io, now);
                        }
                        Err(e) if would_block(&e) => up.readable = false,
                        Err(e) if interrupted(&e) => {}
                        Err(_) => {
                            up.readable = false;
                            up.read_closed = true;
                            c.s.on_upstream_eof(up.io, true, now);
                        }
                    }
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }

        if c.s.wants_close() {
            self.close_conn(k);
            return;
        }
        c.s.park_buffers(&mut io.bufs);
        // An idle connection may make room at the limit.
        io.idle.track(&mut c.idle, c.s.is_idle(), k);
        // Core's rule: a new heap entry only when the deadline moves earlier.
        if let Some(d) = c.timer.rearm(&c.s) {
            self.timers.push(Reverse((d, k, c.gen)));
            self.compact_timers();
        }
    }

    /// Close client connection `k` (and its upstream connection) now.
    fn close_conn(&mut self, k: usize) {
        let Some(mut c) = self.conns.try_remove(k) else {
            return;
        };
        if let Some(u) = c.up.take() {
            self.io.close_up(u);
        }
        if let Some(slot) = c.idle.take() {
            self.io.idle.leave(slot);
        }
        // Dropping the socket closes it: a FIN when everything sent was read, as a
        // `shutdown` first would send (it costs a system call and changes nothing: unread
        // input makes either a reset).
        c.s.recycle(&mut self.io.bufs);
        if !c.admin {
            self.sh.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Entries of closed connections, and ones superseded by an earlier deadline, stay in
    /// the heap until they come due; under connection churn that is rate x timeout of them.
    /// Past twice the live connections, drop them (linear, so amortised O(1) per push).
    fn compact_timers(&mut self) {
        if self.timers.len() <= 2 * self.conns.len() + 64 {
            return;
        }
        let conns = &self.conns;
        self.timers.retain(|Reverse((t, k, gen))| {
            conns
                .get(*k)
                .is_some_and(|c| c.gen == *gen && c.timer.armed() == Some(*t))
        });
    }
}

fn connect(
    io: &mut Io,
    addr: SocketAddr,
    upstream: u16,
    backend: u16,
    (owner, up_io): (usize, IoId),
    now: Instant,
) -> io::Result<usize> {
    let mut stream = TcpStream::connect(addr)?;
    let _ = stream.set_nodelay(true);
    let e = io.ups.vacant_entry();
    let u = e.key();
    io.registry.register(
        &mut stream,
        upstream_token(u),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    e.insert(Up {
        stream,
        owner: Some(owner),
        io: up_io,
        upstream,
        backend,
        meta: ConnMeta {
            created: now,
            requests: 0,
        },
        connecting: true,
        readable: false,
        read_closed: false,
        writable: false,
    });
    Ok(u)
}
