//! trireme on tokio. The adapter owns sockets, one timer per connection and the upstream
//! sockets held in core's [`Pool`]; every decision (parsing, routing, picking, retrying,
//! deadlines) is made by [`trireme_core::proxy::Session`].

#![deny(clippy::print_stdout, clippy::print_stderr)]

use parking_lot::Mutex;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use trireme_core::admission::{IdleList, IdleSlot};
use trireme_core::background::{Background, End, Run};
use trireme_core::buf::BufPool;
use trireme_core::config::{RunOptions, TokioFlavor};
use trireme_core::driver::{Admit, Gate, TimerSlot, ACCEPT_BACKOFF, POOL_SWEEP_EVERY};
use trireme_core::proxy::{Action, IoId, ProxyContext, Session};
use trireme_core::shutdown::Shutdown;
use trireme_core::upstream::{ConnMeta, Liveness, Pool};
use trireme_core::wake::{Wake, Waker as CoreWaker};
use trireme_rt_support::{AdminListener, Listeners};

/// Idle upstream connections, one pool per upstream, shared by all tasks.
///
/// No task reads an idle pooled socket, so each one is watched instead: when it is
/// pooled, the watcher's waker is registered on its read readiness (no system call);
/// bytes or a close then wake the watcher task, which looks at the pools and closes such
/// connections at once. Taking a connection still peeks at it (core's rule).
struct Pools {
    by_upstream: Vec<Mutex<Pool<TcpStream>>>,
    /// Woken when a watched idle socket turns readable.
    watch: Arc<tokio::sync::Notify>,
    waker: std::task::Waker,
}

/// A connection task's address for core's wake-ups (another request's fetch it waits on
/// moved): a permit, so a wake-up between two polls is not lost.
struct TaskWake(tokio::sync::Notify);

impl Wake for TaskWake {
    fn wake(&self, _token: u64) {
        self.0.notify_one();
    }
}

/// `select!` evaluates every branch expression, enabled or not: this never unwraps.
async fn woken_opt(w: Option<&TaskWake>) {
    match w {
        Some(w) => w.0.notified().await,
        None => std::future::pending().await,
    }
}

/// Turns a readiness wake-up of an idle socket into a notification for the watcher.
struct WatchWake(Arc<tokio::sync::Notify>);

impl std::task::Wake for WatchWake {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

impl Pools {
    fn new(ctx: &ProxyContext) -> Self {
        let watch = Arc::new(tokio::sync::Notify::new());
        Pools {
            by_upstream: Pool::for_each_upstream(ctx)
                .into_iter()
                .map(Mutex::new)
                .collect(),
            waker: std::task::Waker::from(Arc::new(WatchWake(watch.clone()))),
            watch,
        }
    }

    /// What an idle socket's readiness says, registering the watcher for the next change:
    /// not readable (the common case: no system call), or readable and then peeked at
    /// (readiness left over from the last read is cleared).
    fn watched(&self, s: &TcpStream) -> Liveness {
        use std::task::{Context, Poll};
        let mut cx = Context::from_waker(&self.waker);
        match s.poll_read_ready(&mut cx) {
            Poll::Pending => Liveness::Quiet,
            Poll::Ready(Err(_)) => Liveness::Closed,
            Poll::Ready(Ok(())) => match probe(s) {
                Liveness::Quiet => {
                    let _ = s.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                    match s.poll_read_ready(&mut cx) {
                        Poll::Pending => Liveness::Quiet,
                        Poll::Ready(_) => probe(s),
                    }
                }
                l => l,
            },
        }
    }

    /// An idle connection, checked by core's pool: one with unread bytes or a closed peer
    /// is never handed out (it is dropped, which closes it).
    fn take(&self, upstream: u16, backend: u16, now: Instant) -> Option<(TcpStream, ConnMeta)> {
        self.by_upstream[upstream as usize]
            .lock()
            .take(backend as usize, now, probe, drop)
    }

    /// A released connection (core's [`Pool::release`] rule); one refused is dropped, which
    /// closes it.
    fn release(&self, upstream: u16, backend: u16, s: TcpStream, meta: ConnMeta, now: Instant) {
        use std::os::fd::AsRawFd;
        let (state, fd) = (self.watched(&s), s.as_raw_fd());
        let mut pool = self.by_upstream[upstream as usize].lock();
        if pool.release(backend as usize, s, meta, true, now).is_some() {
            return;
        }
        if state != Liveness::Quiet {
            // Readable already: out again at once, closed and counted by the pool.
            let b = backend as usize;
            drop(pool.on_idle_readable(b, now, |c| c.as_raw_fd() == fd, |_| state));
        }
    }

    /// Expired connections, and idle ones the backend closed or wrote to (after a
    /// watcher wake-up, and on every tick).
    fn sweep(&self, now: Instant) {
        for p in &self.by_upstream {
            p.lock().sweep(now, |s| self.watched(s), drop);
        }
    }
}

/// The liveness probe of a pooled socket: a peek at the kernel's receive queue (tokio's
/// cached readiness may lag behind what has arrived).
fn probe(s: &TcpStream) -> Liveness {
    use std::os::fd::AsRawFd;
    trireme_rt_support::peek_idle(s.as_raw_fd())
}

/// Run the proxy on `listeners` until `shutdown` is requested, then drain. Blocks the
/// calling thread. Multi-thread flavour: one work-stealing runtime with `workers` threads
/// accepting from the first listener. Current-thread flavour: one single-threaded runtime
/// per listener, each on its own thread (thread-per-core, like trireme-mio). Upstream pools
/// and the connection count are shared by all threads either way.
pub fn run(
    ctx: Arc<ProxyContext>,
    opts: RunOptions,
    listeners: Listeners,
    shutdown: Arc<Shutdown>,
) -> io::Result<()> {
    let Listeners { proxy, mut admin } = listeners;
    let shared = Arc::new(Shared {
        pools: Pools::new(&ctx),
        idle: Mutex::new(IdleList::default()),
        ctx,
        active: AtomicUsize::new(0),
        admin_open: AtomicUsize::new(0),
        opts,
    });
    match shared.opts.tokio_flavor {
        TokioFlavor::MultiThread => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(shared.opts.workers)
                .enable_all()
                .thread_name("trireme-worker")
                .build()?;
            let l = proxy
                .into_iter()
                .next()
                .ok_or(io::ErrorKind::InvalidInput)?;
            rt.block_on(serve(shared, l, admin, shutdown, true))
        }
        TokioFlavor::CurrentThread => {
            let mut threads = Vec::new();
            for (i, l) in proxy.into_iter().enumerate() {
                let (shared, shutdown, admin) = (shared.clone(), shutdown.clone(), admin.take());
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("trireme-worker-{i}"))
                        .spawn(move || -> io::Result<()> {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()?;
                            rt.block_on(serve(shared, l, admin, shutdown, i == 0))
                        })?,
                );
            }
            let mut res = Ok(());
            for t in threads {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => res = Err(e),
                    Err(_) => res = Err(io::Error::other("worker thread panicked")),
                }
            }
            res
        }
    }
}

struct Shared {
    ctx: Arc<ProxyContext>,
    pools: Pools,
    /// Client connections waiting for a request, by descriptor (oldest first): at the
    /// limit the oldest is shut down to admit a new one. A connection leaves it before
    /// its socket closes, and the shutdown happens under the lock, so a descriptor taken
    /// from it is open.
    idle: Mutex<IdleList<RawFd>>,
    /// Client connections open, over all threads.
    active: AtomicUsize,
    /// Admin connections open (not counted against `max_connections`).
    admin_open: AtomicUsize,
    opts: RunOptions,
}

async fn shutdown_requested(sd: Arc<Shutdown>) {
    let n = Arc::new(tokio::sync::Notify::new());
    let n2 = n.clone();
    sd.on_request(move || n2.notify_one());
    n.notified().await;
}

async fn serve(
    sh: Arc<Shared>,
    listener: std::net::TcpListener,
    admin: Option<AdminListener>,
    shutdown: Arc<Shutdown>,
    report: bool,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let (drain_tx, drain_rx) = watch::channel(false);
    if let Some(a) = admin {
        a.listener.set_nonblocking(true)?;
        let l = TcpListener::from_std(a.listener)?;
        tokio::spawn(serve_admin(l, a.ctx, sh.clone(), drain_rx.clone()));
    }
    let mut gate = Gate::new(
        sh.ctx.per_ip.clone(),
        sh.opts.max_connections,
        sh.ctx.metrics.clone(),
    );
    if report {
        // Health probes, cache refreshes and warming on this runtime's own threads.
        let bg = Background::new(&sh.ctx, sh.opts.refresh_concurrency, Instant::now());
        if !bg.is_empty() {
            tokio::spawn(run_background(bg, sh.clone(), drain_rx.clone()));
        }
    }
    {
        let sh = sh.clone();
        let mut drain = drain_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POOL_SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => sh.pools.sweep(Instant::now()),
                    _ = sh.pools.watch.notified() => sh.pools.sweep(Instant::now()),
                    _ = drain.changed() => break,
                }
            }
        });
    }

    let shutdown = shutdown_requested(shutdown);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        let _ = gate.accept_failed(&e, Instant::now());
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let open = sh.active.load(Ordering::Relaxed);
                // Make room: the connection idle the longest is shut down (its read sees the
                // end and it closes). Under the lock: a descriptor in the idle list is open
                // (see `idle`), and only while the lock is held.
                let evict = || {
                    let mut idle = sh.idle.lock();
                    idle.pop_oldest().map(trireme_rt_support::shutdown_fd)
                };
                let ip_slot = match gate.admit(peer, open, evict, Instant::now()) {
                    Admit::Refuse => continue,
                    Admit::Open { ip, .. } => ip,
                };
                let _ = stream.set_nodelay(true);
                sh.active.fetch_add(1, Ordering::Relaxed);
                let (sh, drain) = (sh.clone(), drain_rx.clone());
                tokio::spawn(async move {
                    let _ip = ip_slot;
                    connection(stream, peer, sh.ctx.clone(), &sh, drain).await;
                    sh.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    drop(listener);
    if report {
        tracing::info!(
            connections = sh.active.load(Ordering::Relaxed),
            timeout_secs = sh.opts.drain_timeout.as_secs_f64(),
            "shutting down: stopped accepting, draining"
        );
    }
    let _ = drain_tx.send(true);
    let deadline = Instant::now() + sh.opts.drain_timeout;
    let open = || sh.active.load(Ordering::Relaxed) + sh.admin_open.load(Ordering::Relaxed);
    while open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = sh.active.load(Ordering::Relaxed);
    if !report {
    } else if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout reached; closing remaining connections"
        );
    } else {
        tracing::info!("drained; exiting");
    }
    Ok(())
}

/// The admin listener until the drain: its connections are sessions of the admin context,
/// bounded by core (`admin.max_connections`), not by the proxy's gate or count.
async fn serve_admin(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    sh: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = drain.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    sh.admin_open.fetch_add(1, Ordering::Relaxed);
                    let (sh, ctx, drain) = (sh.clone(), ctx.clone(), drain.clone());
                    tokio::spawn(async move {
                        connection(stream, peer, ctx, &sh, drain).await;
                        sh.admin_open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

struct UpConn {
    stream: TcpStream,
    meta: ConnMeta,
}

type Connecting = std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Core's background exchanges ([`Background`]: health probes, the cache's refreshes and
/// warming) on this runtime's threads: each run is a task of its own (a black-holed
/// backend delays no other). Queued fetches and ended runs notify the loop; probes come
/// due on the timer.
async fn run_background(bg: Background, sh: Arc<Shared>, mut drain: watch::Receiver<bool>) {
    let bg = Arc::new(Mutex::new(bg));
    let wake = Arc::new(tokio::sync::Notify::new());
    if let Some(cache) = &sh.ctx.cache {
        let w = wake.clone();
        cache.set_refresher(move || w.notify_one());
    }
    // Work was queued: runs that keep their connection (the L2 writer) look for it.
    let (kick, kicked) = watch::channel(0u64);
    loop {
        let now = Instant::now();
        while let Some(run) = bg.lock().poll_run(now) {
            tokio::spawn(carry(run, bg.clone(), wake.clone(), kicked.clone()));
        }
        let next = bg.lock().next_deadline();
        let until = next.unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {}
            _ = wake.notified() => kick.send_modify(|n| *n += 1),
            _ = drain.changed() => break,
        }
    }
    if let Some(cache) = &sh.ctx.cache {
        cache.set_refresher(|| {});
    }
}

/// Carry out `run` (and the retries it turns into), handing each outcome back.
async fn carry(
    mut run: Run,
    bg: Arc<Mutex<Background>>,
    wake: Arc<tokio::sync::Notify>,
    mut kicked: watch::Receiver<u64>,
) {
    loop {
        let end = exchange(&mut run, &mut kicked).await;
        let next = bg.lock().finish(run, end, Instant::now());
        // A run ended: the next probe's time moved, a fetch slot is free.
        wake.notify_one();
        match next {
            Some(r) => run = r,
            None => return,
        }
    }
}

/// One run's I/O: connect, write, read until the run is done or the peer closes, each step
/// before the run's deadline (which reads move on).
async fn exchange(run: &mut Run, kicked: &mut watch::Receiver<u64>) -> End {
    use tokio::io::AsyncReadExt;
    let at = |run: &Run| tokio::time::Instant::from_std(run.deadline);
    let Ok(Ok(mut s)) = tokio::time::timeout_at(at(run), TcpStream::connect(run.addr)).await else {
        return End::Failed;
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // What the run has to write: its request, or (a conversation: the L2 tier's) what
        // a reply or queued work gave it.
        while !run.pending().is_empty() {
            let n = run.pending().len();
            match tokio::time::timeout_at(at(run), s.write_all(run.pending())).await {
                Ok(Ok(())) => run.wrote(n),
                _ => return End::Failed,
            }
        }
        tokio::select! {
            r = tokio::time::timeout_at(at(run), s.read(&mut chunk)) => match r {
                Ok(Ok(0)) => return End::Closed,
                Ok(Ok(n)) => {
                    if run.on_read(&chunk[..n], Instant::now()) {
                        return End::Done;
                    }
                }
                _ => return End::Failed,
            },
            Ok(()) = kicked.changed() => {
                run.refill(Instant::now());
            }
        }
    }
}

fn connect(addr: SocketAddr) -> Connecting {
    Box::pin(async move {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_nodelay(true)?;
        sock.connect(addr).await
    })
}

/// Write as much of `out`'s first segments as the socket takes now (one vectored write
/// while more than one has bytes left). `Ok(n)`: bytes written (0 = would block).
fn write_now(s: &TcpStream, out: &trireme_core::buf::OutBuf) -> io::Result<usize> {
    let mut iov = [io::IoSlice::new(&[]); trireme_core::buf::WRITE_IOV];
    let n = out.io_slices(&mut iov);
    let mut bufs = &mut iov[..n];
    let mut done = 0;
    while !bufs.is_empty() {
        let r = if bufs.len() == 1 {
            s.try_write(&bufs[0])
        } else {
            s.try_write_vectored(bufs)
        };
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                done += k;
                io::IoSlice::advance_slices(&mut bufs, k);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ProxyContext>,
    sh: &Shared,
    mut drain: watch::Receiver<bool>,
) {
    let pools = &sh.pools;
    // Only requests answered from the cache wait on another's fetch: no cache, no waker.
    let may_wait = ctx.sessions_may_wait();
    let mut s = Session::new(ctx, peer, Instant::now());
    let woken = may_wait.then(|| {
        let w = Arc::new(TaskWake(tokio::sync::Notify::new()));
        let target: Arc<dyn Wake> = w.clone();
        s.set_waker(CoreWaker::new(target, 0));
        w
    });
    let mut up: Option<UpConn> = None;
    let mut connecting: Option<Connecting> = None;
    let mut draining = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let sleep = tokio::time::sleep_until(far);
    tokio::pin!(sleep);
    let mut timer = TimerSlot::default();
    let cfd = {
        use std::os::fd::AsRawFd;
        client.as_raw_fd()
    };
    let mut idle_slot: Option<IdleSlot> = None;
    // The session's name for the upstream I/O (from its latest `Connect`; a released
    // connection or connect is dropped, so every completion is about this one).
    let mut uio = IoId::default();
    // The time an event was handled at stands for the turn of the loop that follows it
    // (no wait comes between): one clock read per event.
    let mut now = Instant::now();

    loop {
        // Drain actions and write what can be written, until nothing changes.
        loop {
            let mut progress = false;
            while let Some(a) = s.poll_action() {
                progress = true;
                match a {
                    Action::Connect {
                        io,
                        upstream,
                        backend,
                        addr,
                        fresh,
                    } => {
                        uio = io;
                        up = None;
                        connecting = None;
                        let pooled = if fresh {
                            None
                        } else {
                            pools.take(upstream, backend, now)
                        };
                        match pooled {
                            Some((stream, meta)) => {
                                up = Some(UpConn { stream, meta });
                                s.on_upstream_connected(uio, true, now);
                            }
                            None => connecting = Some(connect(addr)),
                        }
                    }
                    Action::ReleaseUpstream {
                        io: _,
                        upstream,
                        backend,
                        reuse,
                    } => {
                        connecting = None;
                        if let Some(c) = up.take() {
                            if reuse {
                                pools.release(upstream, backend, c.stream, c.meta, now);
                            }
                        }
                    }
                }
            }
            if s.wants_close() {
                break;
            }
            if s.has_client_output() {
                match write_now(&client, s.client_output()) {
                    Ok(0) => {}
                    Ok(n) => {
                        s.on_client_written(n, now);
                        progress = true;
                    }
                    Err(_) => {
                        s.on_client_error(now);
                        progress = true;
                    }
                }
            }
            if let Some(c) = &up {
                if s.has_upstream_output() {
                    match write_now(&c.stream, s.upstream_output()) {
                        Ok(0) => {}
                        Ok(n) => {
                            s.on_upstream_written(uio, n, now);
                            progress = true;
                        }
                        Err(_) => {
                            s.on_upstream_eof(uio, true, now);
                            progress = true;
                        }
                    }
                }
            }
            if !progress {
                break;
            }
        }
        if s.wants_close() {
            break;
        }

        // Timer: core's re-arm rule (only when the deadline moves earlier).
        if let Some(d) = timer.rearm(&s) {
            sleep.as_mut().reset(tokio::time::Instant::from_std(d));
        }

        with_pool(|p| s.park_buffers(p));
        // An idle connection may make room at the limit (the lock only on a change).
        let idle = s.is_idle();
        if idle != idle_slot.is_some() {
            sh.idle.lock().track(&mut idle_slot, idle, cfd);
        }
        let ci = interest(s.wants_client_read(), s.has_client_output());
        let ui = match &up {
            Some(_) => interest(s.wants_upstream_read(), s.has_upstream_output()),
            None => None,
        };
        tokio::select! {
            r = ready_opt(Some(&client), ci), if ci.is_some() => {
                now = Instant::now();
                match r {
                    Err(_) => s.on_client_error(now),
                    Ok(ready) => {
                        if ready.is_readable() && s.wants_client_read() {
                            let closed = ready.is_read_closed();
                            match with_pool(|p| read_once(&client, s.reserve_client_in(p), closed)) {
                                Ok(0) => s.on_client_eof(now),
                                Ok(_) => s.on_client_read(now),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                                Err(_) => s.on_client_error(now),
                            }
                        }
                    }
                }
            }
            r = ready_opt(up.as_ref().map(|c| &c.stream), ui), if ui.is_some() => {
                now = Instant::now();
                match r {
                    Err(_) => s.on_upstream_eof(uio, true, now),
                    Ok(ready) => {
                        if ready.is_readable() && s.wants_upstream_read() {
                            let Some(c) = up.as_ref() else { continue };
                            let closed = ready.is_read_closed();
                            match with_pool(|p| read_once(&c.stream, s.reserve_up_in(p), closed)) {
                                Ok(0) => s.on_upstream_eof(uio, false, now),
                                Ok(_) => s.on_upstream_read(uio, now),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                                Err(_) => s.on_upstream_eof(uio, true, now),
                            }
                        }
                    }
                }
            }
            r = connect_opt(connecting.as_mut()), if connecting.is_some() => {
                connecting = None;
                now = Instant::now();
                match r {
                    Ok(stream) => {
                        up = Some(UpConn { stream, meta: ConnMeta { created: now, requests: 0 } });
                        s.on_upstream_connected(uio, false, now);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upstream connect failed");
                        s.on_upstream_connect_failed(uio, now);
                    }
                }
            }
            _ = woken_opt(woken.as_deref()), if woken.is_some() => {
                now = Instant::now();
                s.on_wake(now);
            }
            _ = &mut sleep, if timer.armed().is_some() => {
                sleep.as_mut().reset(far);
                now = Instant::now();
                timer.fire(&mut s, now);
            }
            _ = drain.changed(), if !draining => {
                draining = true;
                // Read first: a request that reached the socket before the drain is
                // served (with `Connection: close`) rather than cut off.
                now = Instant::now();
                if s.wants_client_read() {
                    match with_pool(|p| client.try_read_buf(s.reserve_client_in(p))) {
                        Ok(0) => s.on_client_eof(now),
                        Ok(_) => s.on_client_read(now),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => s.on_client_error(now),
                    }
                }
                s.begin_drain(now);
            }
        }
    }
    // Out of the idle list before the socket closes.
    if let Some(slot) = idle_slot {
        sh.idle.lock().leave(slot);
    }
    // Closing: flush is done (or abandoned). Dropping the socket closes it: a FIN when
    // everything sent was read (a `shutdown` first costs a system call and changes nothing:
    // unread input makes either a reset).
    with_pool(|p| s.recycle(p));
    drop(client);
}

/// Read once into the spare capacity of `buf`. A short read means the socket's receive
/// queue is drained (TCP), so tokio's cached read readiness is cleared right away (by
/// answering `WouldBlock` to `try_io`): that saves the EAGAIN read tokio would otherwise
/// need to learn it. Not when the peer has already closed (`read_closed`): the next read
/// must see the EOF, and no new readiness event would announce it.
fn read_once(s: &TcpStream, buf: &mut bytes::BytesMut, read_closed: bool) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let mut short = None;
    let r = s.try_io(Interest::READABLE, || {
        let (n, room) = trireme_rt_support::read_spare(fd, buf)?;
        if n > 0 && n < room && !read_closed {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

thread_local! {
    /// Free buffers of this worker thread (tasks may move between threads; buffers are
    /// only memory, so they simply join the pool of the thread that frees them).
    static BUFS: std::cell::RefCell<BufPool> = std::cell::RefCell::new(BufPool::default());
}

fn with_pool<R>(f: impl FnOnce(&mut BufPool) -> R) -> R {
    BUFS.with(|b| f(&mut b.borrow_mut()))
}

/// `select!` evaluates every branch expression, enabled or not: these never unwrap.
async fn ready_opt(s: Option<&TcpStream>, i: Option<Interest>) -> io::Result<tokio::io::Ready> {
    match (s, i) {
        (Some(s), Some(i)) => s.ready(i).await,
        _ => std::future::pending().await,
    }
}

async fn connect_opt(c: Option<&mut Connecting>) -> io::Result<TcpStream> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn interest(read: bool, write: bool) -> Option<Interest> {
    match (read, write) {
        (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
        (true, false) => Some(Interest::READABLE),
        (false, true) => Some(Interest::WRITABLE),
        (false, false) => None,
    }
}
