//! trireme on tokio. The adapter owns sockets, one timer per connection and the upstream
//! sockets held in core's [`Pool`]; every decision (parsing, routing, picking, retrying,
//! deadlines) is made by [`trireme_core::proxy::Session`].

use parking_lot::Mutex;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use trireme_core::http1::head::{probe_status, Parsed};
use trireme_core::proxy::{Action, ProxyContext, Session};
use trireme_core::upstream::{ConnMeta, HealthChecker, Pool};

/// What the runtime needs besides the shared context.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker threads (0: one per core).
    pub workers: usize,
    pub max_connections: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

/// Idle upstream connections, one pool per upstream, shared by all tasks.
struct Pools {
    by_upstream: Vec<Mutex<Pool<TcpStream>>>,
}

impl Pools {
    fn new(ctx: &ProxyContext) -> Self {
        Pools {
            by_upstream: ctx
                .upstreams
                .iter()
                .map(|u| Mutex::new(Pool::new(u.backends.len(), u.cfg.pool.clone())))
                .collect(),
        }
    }

    /// An idle connection the backend has not closed meanwhile.
    fn take(&self, upstream: u16, backend: u16, now: Instant) -> Option<(TcpStream, ConnMeta)> {
        let pool = &self.by_upstream[upstream as usize];
        loop {
            let (s, meta) = pool.lock().take(backend as usize, now, drop)?;
            if idle_conn_usable(&s) {
                return Some((s, meta));
            }
        }
    }

    fn put(&self, upstream: u16, backend: u16, s: TcpStream, meta: ConnMeta, now: Instant) {
        let rejected =
            self.by_upstream[upstream as usize]
                .lock()
                .put(backend as usize, s, meta, now);
        drop(rejected);
    }

    fn evict(&self, now: Instant) {
        for p in &self.by_upstream {
            p.lock().evict_expired(now, drop);
        }
    }
}

/// An idle upstream connection is usable when reading from it would block: no FIN, no RST,
/// no stray bytes. Tokio caches read readiness until a read returns WouldBlock, and the
/// last response read usually leaves it set, so confirm with one non-blocking read then.
/// (A close still in flight is caught by the session's retry on a fresh connection.)
fn idle_conn_usable(s: &TcpStream) -> bool {
    use std::task::{Context, Poll};
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    match s.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

fn noop_waker() -> std::task::Waker {
    use std::task::{RawWaker, RawWakerVTable, Waker};
    fn clone(_: *const ()) -> RawWaker {
        RawWaker::new(std::ptr::null(), &VTABLE)
    }
    fn noop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, noop, noop, noop);
    // SAFETY: every vtable function ignores the data pointer.
    unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) }
}

/// Bind the listening socket (SO_REUSEADDR, large backlog).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Run the proxy until `shutdown` completes, then drain. Blocks the calling thread.
/// `on_ready` is called with the bound address once the listener is up.
pub fn run(
    ctx: Arc<ProxyContext>,
    opts: RunOptions,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if opts.workers > 0 {
        b.worker_threads(opts.workers);
    }
    let rt = b.enable_all().thread_name("trireme-worker").build()?;
    rt.block_on(serve(ctx, opts, listener, shutdown))
}

async fn serve(
    ctx: Arc<ProxyContext>,
    opts: RunOptions,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let pools = Arc::new(Pools::new(&ctx));
    let active = Arc::new(AtomicUsize::new(0));
    let (drain_tx, drain_rx) = watch::channel(false);

    for up in &ctx.upstreams {
        if let Some(hc) = up.cfg.active.clone() {
            let checker = HealthChecker::new(up.clone(), hc, Instant::now());
            tokio::spawn(health_loop(checker, drain_rx.clone()));
        }
    }
    {
        let pools = pools.clone();
        let mut drain = drain_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => pools.evict(Instant::now()),
                    _ = drain.changed() => break,
                }
            }
        });
    }

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
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if active.load(Ordering::Relaxed) >= opts.max_connections {
                    tracing::warn!(client = %peer, max = opts.max_connections, "max_connections reached; closing new connection");
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                active.fetch_add(1, Ordering::Relaxed);
                let (ctx, pools, active, drain) = (ctx.clone(), pools.clone(), active.clone(), drain_rx.clone());
                tokio::spawn(async move {
                    connection(stream, peer, ctx, pools, drain).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    drop(listener);
    let in_flight = active.load(Ordering::Relaxed);
    tracing::info!(
        connections = in_flight,
        timeout_secs = opts.drain_timeout.as_secs_f64(),
        "shutting down: stopped accepting, draining"
    );
    let _ = drain_tx.send(true);
    let deadline = Instant::now() + opts.drain_timeout;
    while active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = active.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout reached; closing remaining connections"
        );
    } else {
        tracing::info!("drained; exiting");
    }
    Ok(())
}

struct UpConn {
    stream: TcpStream,
    meta: ConnMeta,
}

type Connecting = std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

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

/// Write as much of `buf` as the socket takes now. `Ok(n)`: bytes written (0 = would block).
fn write_now(s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match s.try_write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
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
    pools: Arc<Pools>,
    mut drain: watch::Receiver<bool>,
) {
    let mut s = Session::new(ctx, peer, Instant::now());
    let mut up: Option<UpConn> = None;
    let mut connecting: Option<Connecting> = None;
    let mut draining = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let sleep = tokio::time::sleep_until(far);
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;

    loop {
        let now = Instant::now();
        // Drain actions and write what can be written, until nothing changes.
        loop {
            let mut progress = false;
            while let Some(a) = s.poll_action() {
                progress = true;
                match a {
                    Action::Connect {
                        upstream,
                        backend,
                        addr,
                        fresh,
                    } => {
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
                                s.on_upstream_connected(true, now);
                            }
                            None => connecting = Some(connect(addr)),
                        }
                    }
                    Action::ReleaseUpstream {
                        upstream,
                        backend,
                        reuse,
                    } => {
                        connecting = None;
                        if let Some(mut c) = up.take() {
                            if reuse {
                                c.meta.requests += 1;
                                pools.put(upstream, backend, c.stream, c.meta, now);
                            }
                        }
                    }
                }
            }
            if s.wants_close() {
                break;
            }
            if !s.client_out.is_empty() {
                match write_now(&client, s.client_out.pending()) {
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
                if !s.up_out.is_empty() {
                    match write_now(&c.stream, s.up_out.pending()) {
                        Ok(0) => {}
                        Ok(n) => {
                            s.on_upstream_written(n, now);
                            progress = true;
                        }
                        Err(_) => {
                            s.on_upstream_eof(true, now);
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

        // Timer: re-arm only when the deadline moves earlier; a late wake-up is harmless
        // because the session rechecks its deadline against `now`.
        let deadline = s.deadline();
        if let Some(d) = deadline {
            if armed.is_none_or(|a| d < a) {
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
                armed = Some(d);
            }
        }

        let ci = interest(s.wants_client_read(), !s.client_out.is_empty());
        let ui = match &up {
            Some(_) => interest(s.wants_upstream_read(), !s.up_out.is_empty()),
            None => None,
        };
        tokio::select! {
            r = ready_opt(Some(&client), ci), if ci.is_some() => {
                let now = Instant::now();
                match r {
                    Err(_) => s.on_client_error(now),
                    Ok(ready) => {
                        if ready.is_readable() && s.wants_client_read() {
                            match client.try_read_buf(s.reserve_client_in()) {
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
                let now = Instant::now();
                match r {
                    Err(_) => s.on_upstream_eof(true, now),
                    Ok(ready) => {
                        if ready.is_readable() && s.wants_upstream_read() {
                            let Some(c) = up.as_ref() else { continue };
                            match c.stream.try_read_buf(s.reserve_up_in()) {
                                Ok(0) => s.on_upstream_eof(false, now),
                                Ok(_) => s.on_upstream_read(now),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                                Err(_) => s.on_upstream_eof(true, now),
                            }
                        }
                    }
                }
            }
            r = connect_opt(connecting.as_mut()), if connecting.is_some() => {
                connecting = None;
                let now = Instant::now();
                match r {
                    Ok(stream) => {
                        up = Some(UpConn { stream, meta: ConnMeta { created: now, requests: 0 } });
                        s.on_upstream_connected(false, now);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upstream connect failed");
                        s.on_upstream_connect_failed(now);
                    }
                }
            }
            _ = &mut sleep, if armed.is_some() => {
                armed = None;
                sleep.as_mut().reset(far);
                s.on_timeout(Instant::now());
            }
            _ = drain.changed(), if !draining => {
                draining = true;
                s.begin_drain(Instant::now());
            }
        }
    }
    // Closing: flush is done (or abandoned); a graceful FIN.
    let mut client = client;
    let _ = client.shutdown().await;
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

async fn health_loop(mut hc: HealthChecker, mut drain: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Option<u16>)>();
    loop {
        let now = Instant::now();
        while let Some(p) = hc.poll_probe(now) {
            let req = hc.request(p.backend).to_vec();
            let tx = tx.clone();
            tokio::spawn(async move {
                let status = tokio::time::timeout(p.timeout, probe(p.addr, req))
                    .await
                    .ok()
                    .flatten();
                let _ = tx.send((p.backend, status));
            });
        }
        let next = hc.next_deadline().unwrap_or(now + Duration::from_secs(1));
        tokio::select! {
            Some((b, st)) = rx.recv() => hc.on_result(b, st, Instant::now()),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {}
            _ = drain.changed() => return,
        }
    }
}

async fn probe(addr: SocketAddr, req: Vec<u8>) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&req).await.ok()?;
    let mut buf = Vec::with_capacity(256);
    loop {
        let n = s.read_buf(&mut buf).await.ok()?;
        match probe_status(&buf) {
            Parsed::Complete(r) => return r.ok(),
            Parsed::Partial if n == 0 => return None,
            Parsed::Partial => {}
        }
    }
}
