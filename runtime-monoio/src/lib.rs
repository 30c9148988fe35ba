//! trireme on monoio (io_uring), thread per core.
//!
//! Each worker thread runs its own monoio runtime with its own `SO_REUSEPORT` listener, its
//! own upstream pools and buffer pool; nothing is shared between workers but the proxy
//! context (atomics) and the connection count. io_uring operations own their buffers, so
//! reads go into pooled `BytesMut` buffers that are handed to the session when they
//! complete (swapped in, not copied, when the session had nothing buffered), and writes
//! borrow the session's output, its owned allocation and the shared body segments among
//! its bytes, with [`OutBuf::lend`] for as long as they fly: one vectored write, nothing
//! copied.
//!
//! When io_uring is unavailable (old kernel, seccomp, memlock limits) the workers run on
//! monoio's epoll ("legacy") driver instead, and say so at start.
//!
//! Every decision is the session's ([`trireme_core::proxy::Session`]); a connection task
//! keeps at most one read and one write in flight per socket and waits on whichever of
//! them, the connect, the timer or the drain signal completes first.
//!
//! [`OutBuf::lend`]: trireme_core::buf::OutBuf::lend

#![deny(clippy::print_stdout, clippy::print_stderr)]

use bytes::BytesMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::{TcpListener, TcpStream};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use trireme_core::admission::{IdleList, IdleSlot};
use trireme_core::background::{Background, End, Run};
use trireme_core::buf::BufPool;
use trireme_core::config::RunOptions;
use trireme_core::driver::{Admit, Gate, TimerSlot, ACCEPT_BACKOFF, POOL_SWEEP_EVERY};
use trireme_core::proxy::{Action, IoId, ProxyContext, Session, READ_CHUNK, UP_READ_CHUNK};
use trireme_core::shutdown::Shutdown;
use trireme_core::upstream::{ConnMeta, Pool};
use trireme_core::wake::{TokenQueue, Wake, Waker as CoreWaker};
use trireme_rt_support::{peek_idle, AdminListener, Listeners};

/// How often an idle worker looks at the shutdown flag (set from the signal thread).
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Submission queue entries per worker ring.
const RING_ENTRIES: u32 = 4096;

/// `TRIREME_MONOIO_DRIVER=legacy` forces the epoll driver (for tests and comparisons).
pub const DRIVER_ENV: &str = "TRIREME_MONOIO_DRIVER";

struct Shared {
    ctx: Arc<ProxyContext>,
    opts: RunOptions,
    active: AtomicUsize,
}

/// Ring set-up: one thread submits to each ring, and completions run as task work when
/// the worker next enters the kernel instead of interrupting it (no IPI per completion).
fn ring_setup() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    match std::env::var("TRIREME_URING_SETUP").as_deref() {
        Ok("plain") => {}
        Ok("defer") => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        _ => {
            b.setup_coop_taskrun().setup_single_issuer();
        }
    }
    b
}

/// Which driver the workers will use.
fn use_uring() -> bool {
    let forced_legacy = std::env::var(DRIVER_ENV).is_ok_and(|v| v == "legacy");
    !forced_legacy && monoio::utils::detect_uring()
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
    let uring = use_uring();
    if uring {
        tracing::info!(driver = "io_uring", "monoio driver: io_uring");
    } else {
        tracing::warn!(
            driver = "epoll",
            "io_uring unavailable (or {DRIVER_ENV}=legacy): monoio falls back to its epoll driver"
        );
    }
    let sh = Arc::new(Shared {
        ctx,
        opts,
        active: AtomicUsize::new(0),
    });
    let mut threads = Vec::new();
    for (id, l) in proxy.into_iter().enumerate() {
        let (sh, shutdown, admin) = (sh.clone(), shutdown.clone(), admin.take());
        threads.push(
            std::thread::Builder::new()
                .name(format!("trireme-worker-{id}"))
                .spawn(move || -> io::Result<usize> {
                    if uring {
                        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                            .with_entries(RING_ENTRIES)
                            .uring_builder(ring_setup())
                            .enable_timer()
                            .build()?;
                        rt.block_on(worker(id, sh, l, admin, shutdown))
                    } else {
                        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                            .enable_timer()
                            .build()?;
                        rt.block_on(worker(id, sh, l, admin, shutdown))
                    }
                })?,
        );
    }
    trireme_rt_support::join_workers(threads)
}

/// A pooled upstream connection: both halves home, no operation in flight.
struct UpConn {
    rd: OwnedReadHalf<TcpStream>,
    wr: OwnedWriteHalf<TcpStream>,
    fd: RawFd,
}

/// One worker's state, shared by its tasks (single thread: `Rc`, `RefCell`).
struct Local {
    sh: Arc<Shared>,
    pools: RefCell<Vec<Pool<UpConn>>>,
    bufs: RefCell<BufPool>,
    drain: Drain,
    /// Connections open on this worker.
    open: Cell<usize>,
    /// Client connections waiting for a request, by descriptor (oldest first): at the
    /// limit the oldest is shut down to admit a new one.
    idle: RefCell<IdleList<RawFd>>,
    /// Wake-up slots of the connections that may wait on another request's fetch (see
    /// [`Bell`]); `bell` is `None` without a cache (nobody waits then).
    woken: RefCell<Slab<Woken>>,
    bell: Option<Arc<Bell>>,
    /// Free iovec pairs for vectored writes (one per write in flight, reused).
    iovs: RefCell<Vec<Iov>>,
}

impl Local {
    fn iov(&self) -> Iov {
        self.iovs.borrow_mut().pop().unwrap_or_else(empty_iov)
    }

    /// An idle pooled connection, checked by core's pool: one with unread bytes or a
    /// closed peer is never handed out. No read watches idle connections under io_uring,
    /// so the check is a peek at the socket, on every reuse.
    fn take_pooled(&self, upstream: u16, backend: u16, now: Instant) -> Option<(UpConn, ConnMeta)> {
        self.pools.borrow_mut()[upstream as usize].take(
            backend as usize,
            now,
            |c| peek_idle(c.fd),
            drop,
        )
    }
}

/// Core's wake-ups for this worker's connections, from any worker thread: a session
/// waiting on another request's fetch is named by its slot in [`Local::woken`]. Tokens
/// queue here; a byte on a socket pair rings the worker, whose bell task hands them out.
struct Bell {
    queue: TokenQueue,
    tx: std::os::unix::net::UnixStream,
}

impl Wake for Bell {
    fn wake(&self, token: u64) {
        if self.queue.push(token) {
            let _ = io::Write::write(&mut &self.tx, &[1]);
        }
    }
}

/// A connection's wake-up slot: set by the bell task, taken by the connection.
#[derive(Default)]
struct Woken {
    rung: bool,
    waker: Option<Waker>,
}

/// Ready once the bell task marked `slot` (a stale token marks a later connection in the
/// same slot: a spurious wake-up, which the session ignores).
fn poll_woken(local: &Local, slot: usize, cx: &mut std::task::Context<'_>) -> Poll<()> {
    let mut ws = local.woken.borrow_mut();
    let w = &mut ws[slot];
    if std::mem::take(&mut w.rung) {
        return Poll::Ready(());
    }
    match &w.waker {
        Some(k) if k.will_wake(cx.waker()) => {}
        _ => w.waker = Some(cx.waker().clone()),
    }
    Poll::Pending
}

/// The worker's bell task: each ring, mark the slots named since the last one.
async fn ring_bell(local: Rc<Local>, bell: Arc<Bell>, mut rx: monoio::net::UnixStream) {
    let mut buf = Vec::with_capacity(64);
    let mut tokens = Vec::new();
    loop {
        let (r, b) = rx.read(buf).await;
        buf = b;
        buf.clear();
        if !matches!(r, Ok(1..)) {
            return;
        }
        bell.queue.take_into(&mut tokens);
        let mut ws = local.woken.borrow_mut();
        for &t in &tokens {
            if let Some(w) = ws.get_mut(t as usize) {
                w.rung = true;
                if let Some(k) = w.waker.take() {
                    k.wake();
                }
            }
        }
    }
}

/// The drain signal: a flag and the wakers of the connections waiting on it.
#[derive(Default)]
struct Drain {
    on: Cell<bool>,
    wakers: RefCell<Slab<Option<Waker>>>,
}

impl Drain {
    fn start(&self) {
        self.on.set(true);
        for (_, w) in self.wakers.borrow_mut().iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }

    /// Ready once draining; `slot` is this waiter's entry.
    fn poll(&self, slot: usize, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.on.get() {
            return Poll::Ready(());
        }
        let mut ws = self.wakers.borrow_mut();
        match &mut ws[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

async fn worker(
    id: usize,
    sh: Arc<Shared>,
    listener: std::net::TcpListener,
    admin: Option<AdminListener>,
    shutdown: Arc<Shutdown>,
) -> io::Result<usize> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let admin = match admin {
        Some(a) => {
            a.listener.set_nonblocking(true)?;
            Some((TcpListener::from_std(a.listener)?, a.ctx))
        }
        None => None,
    };
    // Only requests answered from the cache wait on another's fetch: no cache, no bell.
    let bell = match sh.ctx.sessions_may_wait() {
        true => {
            let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
            rx.set_nonblocking(true)?;
            tx.set_nonblocking(true)?;
            Some((
                Arc::new(Bell {
                    queue: TokenQueue::default(),
                    tx,
                }),
                monoio::net::UnixStream::from_std(rx)?,
            ))
        }
        false => None,
    };
    let local = Rc::new(Local {
        woken: RefCell::new(Slab::new()),
        iovs: RefCell::new(Vec::new()),
        bell: bell.as_ref().map(|(b, _)| b.clone()),
        pools: RefCell::new(Pool::for_each_upstream(&sh.ctx)),
        sh: sh.clone(),
        bufs: RefCell::new(BufPool::default()),
        drain: Drain::default(),
        open: Cell::new(0),
        idle: RefCell::new(IdleList::default()),
    });
    if id == 0 {
        // Health probes, cache refreshes and warming on this worker's own ring.
        let bg = Background::new(&sh.ctx, sh.opts.refresh_concurrency, Instant::now());
        if !bg.is_empty() {
            monoio::spawn(run_background(bg, local.clone()));
        }
    }
    {
        let local = local.clone();
        monoio::spawn(async move {
            while !local.drain.on.get() {
                monoio::time::sleep(POOL_SWEEP_EVERY).await;
                let now = Instant::now();
                // Expired connections, and idle ones the backend closed or wrote to.
                for p in local.pools.borrow_mut().iter_mut() {
                    p.sweep(now, |c| peek_idle(c.fd), drop);
                }
            }
        });
    }

    if let Some((b, rx)) = bell {
        monoio::spawn(ring_bell(local.clone(), b, rx));
    }
    if let Some((l, ctx)) = admin {
        monoio::spawn(serve_admin(l, ctx, local.clone()));
    }

    let mut gate = Gate::new(
        sh.ctx.per_ip.clone(),
        sh.opts.max_connections,
        sh.ctx.metrics.clone(),
    );
    {
        // One accept in flight for the worker's lifetime (never cancelled mid-way, so a
        // connection the kernel already handed over is never lost), and a tick that looks
        // at the shutdown flag.
        let mut accept = pin!(None);
        let mut tick = pin!(monoio::time::sleep(SHUTDOWN_POLL));
        while !shutdown.is_requested() {
            if accept.is_none() {
                accept.set(Some(listener.accept()));
            }
            let got = poll_fn(|cx| {
                if let Some(f) = accept.as_mut().as_pin_mut() {
                    if let Poll::Ready(r) = f.poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                }
                if tick.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            let Some(r) = got else {
                tick.as_mut()
                    .reset(monoio::time::Instant::now() + SHUTDOWN_POLL);
                continue;
            };
            accept.set(None);
            let (stream, peer) = match r {
                Ok(x) => x,
                Err(e) => {
                    let _ = gate.accept_failed(&e, Instant::now());
                    monoio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let open = sh.active.load(Ordering::Relaxed);
            let evict = || local.idle.borrow_mut().pop_oldest();
            let ip_slot = match gate.admit(peer, open, evict, Instant::now()) {
                Admit::Refuse => continue,
                Admit::Open { ip, evicted } => {
                    // Make room: the connection idle the longest is shut down (its pending
                    // read sees the end and it closes). Its descriptor is still open: a
                    // connection leaves the list before it closes.
                    if let Some(fd) = evicted {
                        trireme_rt_support::shutdown_fd(fd);
                    }
                    ip
                }
            };
            let _ = stream.set_nodelay(true);
            sh.active.fetch_add(1, Ordering::Relaxed);
            local.open.set(local.open.get() + 1);
            let local = local.clone();
            monoio::spawn(async move {
                let _ip = ip_slot;
                connection(stream, peer, local.sh.ctx.clone(), &local).await;
                local.open.set(local.open.get() - 1);
                local.sh.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    drop(listener);
    if id == 0 {
        tracing::info!(
            connections = sh.active.load(Ordering::Relaxed),
            timeout_secs = sh.opts.drain_timeout.as_secs_f64(),
            "shutting down: stopped accepting, draining"
        );
    }
    local.drain.start();
    let deadline = Instant::now() + sh.opts.drain_timeout;
    while local.open.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(local.open.get())
}

/// The admin listener, on this worker's ring until the drain: its connections are sessions
/// of the admin context, bounded by core (`admin.max_connections`), not by the proxy's
/// gate or count.
async fn serve_admin(listener: TcpListener, ctx: Arc<ProxyContext>, local: Rc<Local>) {
    let slot = local.drain.wakers.borrow_mut().insert(None);
    let mut accept = pin!(None);
    loop {
        if accept.is_none() {
            accept.set(Some(listener.accept()));
        }
        let got = poll_fn(|cx| {
            if let Some(f) = accept.as_mut().as_pin_mut() {
                if let Poll::Ready(r) = f.poll(cx) {
                    return Poll::Ready(Some(r));
                }
            }
            if local.drain.poll(slot, cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        accept.set(None);
        match got {
            None => break,
            Some(Ok((stream, peer))) => {
                let _ = stream.set_nodelay(true);
                local.open.set(local.open.get() + 1);
                let (local, ctx) = (local.clone(), ctx.clone());
                monoio::spawn(async move {
                    connection(stream, peer, ctx, &local).await;
                    local.open.set(local.open.get() - 1);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "admin accept failed");
                monoio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    local.drain.wakers.borrow_mut().remove(slot);
}

/// Core's background exchanges ([`Background`]: health probes, the cache's refreshes and
/// warming) on this worker's ring: each run is a task of its own (a black-holed backend
/// delays no other). Queued fetches ring the worker's bell (from any thread); probes come
/// due on the timer.
async fn run_background(bg: Background, local: Rc<Local>) {
    let bg = Rc::new(RefCell::new(bg));
    // Woken by the bell when a fetch is queued (any thread), directly when a run ends.
    let slot = local.woken.borrow_mut().insert(Woken::default());
    if let (Some(bell), Some(cache)) = (&local.bell, &local.sh.ctx.cache) {
        let bell = bell.clone();
        cache.set_refresher(move || bell.wake(slot as u64));
    }
    let far = Duration::from_secs(3600);
    // The woken slots of the runs out: rung when work is queued, so a run that keeps its
    // connection (the L2 writer) looks for it.
    let runs: Rc<RefCell<Vec<usize>>> = Rc::default();
    while !local.drain.on.get() {
        let now = Instant::now();
        for &r in runs.borrow().iter() {
            ring(&local, r);
        }
        loop {
            let Some(run) = bg.borrow_mut().poll_run(now) else {
                break;
            };
            let run_slot = local.woken.borrow_mut().insert(Woken::default());
            runs.borrow_mut().push(run_slot);
            let (bg, local, runs) = (bg.clone(), local.clone(), runs.clone());
            monoio::spawn(async move {
                carry(run, bg, local.clone(), slot, run_slot).await;
                runs.borrow_mut().retain(|&r| r != run_slot);
                local.woken.borrow_mut().remove(run_slot);
            });
        }
        let next = bg.borrow().next_deadline();
        // Look again when a probe comes due, a fetch is queued, or at least every 200 ms
        // (for the drain).
        let wait = next
            .map_or(far, |t| t.saturating_duration_since(now))
            .min(Duration::from_millis(200));
        let mut sleep = pin!(monoio::time::sleep(wait));
        poll_fn(|cx| {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            poll_woken(&local, slot, cx)
        })
        .await;
    }
    if let Some(cache) = &local.sh.ctx.cache {
        cache.set_refresher(|| {});
    }
    local.woken.borrow_mut().remove(slot);
}

/// Mark woken slot `slot` and wake its task.
fn ring(local: &Local, slot: usize) {
    if let Some(w) = local.woken.borrow_mut().get_mut(slot) {
        w.rung = true;
        if let Some(k) = w.waker.take() {
            k.wake();
        }
    }
}

/// Carry out `run` (and the retries it turns into), handing each outcome back. `run_slot`
/// is rung when work is queued (see [`Run::refill`]).
async fn carry(
    mut run: Run,
    bg: Rc<RefCell<Background>>,
    local: Rc<Local>,
    slot: usize,
    run_slot: usize,
) {
    loop {
        let end = exchange(&mut run, &local, run_slot).await;
        let next = bg.borrow_mut().finish(run, end, Instant::now());
        // A run ended: the next probe's time moved, a fetch slot is free.
        ring(&local, slot);
        match next {
            Some(r) => run = r,
            None => return,
        }
    }
}

/// What ended a wait of [`exchange`].
enum RunEvent {
    Read(OwnedReadHalf<TcpStream>, io::Result<usize>, BytesMut),
    Kicked,
    Late,
}

/// One run's I/O: connect, write, read until the run is done or the peer closes, each step
/// before the run's deadline (which reads move on). A run that has more to write after a
/// read or when work is queued (`run_slot` rung; a conversation: the L2 tier's) writes it
/// while its read stays in flight.
async fn exchange(run: &mut Run, local: &Local, run_slot: usize) -> End {
    let left = |run: &Run| run.deadline.saturating_duration_since(Instant::now());
    let Ok(Ok(s)) = monoio::time::timeout(left(run), TcpStream::connect_addr(run.addr)).await
    else {
        return End::Failed;
    };
    let (rd, mut wr) = s.into_split();
    let mut read = pin!(Some(read_owned(rd, BytesMut::with_capacity(16 * 1024))));
    loop {
        while !run.pending().is_empty() {
            let req = run.pending().to_vec();
            let n = req.len();
            match monoio::time::timeout(left(run), wr.write_all(req)).await {
                Ok((Ok(_), _)) => run.wrote(n),
                _ => return End::Failed,
            }
        }
        let mut late = pin!(monoio::time::sleep(left(run)));
        let ev = poll_fn(|cx| {
            if let Some((rd, r, b)) = poll_slot(&mut read, cx) {
                return Poll::Ready(RunEvent::Read(rd, r, b));
            }
            if poll_woken(local, run_slot, cx).is_ready() {
                return Poll::Ready(RunEvent::Kicked);
            }
            if late.as_mut().poll(cx).is_ready() {
                return Poll::Ready(RunEvent::Late);
            }
            Poll::Pending
        })
        .await;
        match ev {
            RunEvent::Late => return End::Failed,
            RunEvent::Kicked => {
                run.refill(Instant::now());
            }
            RunEvent::Read(_, Ok(0), _) => return End::Closed,
            RunEvent::Read(rd, Ok(n), mut b) => {
                if run.on_read(&b[..n], Instant::now()) {
                    return End::Done;
                }
                b.clear();
                read.set(Some(read_owned(rd, b)));
            }
            RunEvent::Read(_, Err(_), _) => return End::Failed,
        }
    }
}

/// A read that owns its half and buffer and hands both back (no borrow to outlive).
async fn read_owned<R: AsyncReadRent>(
    mut half: R,
    buf: BytesMut,
) -> (R, io::Result<usize>, BytesMut) {
    let (r, buf) = half.read(buf).await;
    (half, r, buf)
}

/// What one write owns while the ring has it: the session's output lent to it
/// ([`trireme_core::buf::Lent`]: the owned allocation, pending from an offset, and the
/// shared segments among its bytes, bodies in their read buffers or stored ones) and the
/// iovecs that point into them, written by one vectored write without copying either.
/// Heap memory, so the iovecs' address does not move while the ring owns the write (and
/// the write future, kept in every connection's task, stays one pointer); pooled per
/// worker ([`Local::iovs`]).
struct IovSet {
    iov: [libc::iovec; trireme_core::buf::WRITE_IOV],
    n: usize,
    lent: trireme_core::buf::Lent,
}
type Iov = Box<IovSet>;

fn empty_iov() -> Iov {
    Box::new(IovSet {
        iov: [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; trireme_core::buf::WRITE_IOV],
        n: 0,
        lent: Default::default(),
    })
}

/// One write in flight (see [`IovSet`]).
struct Out {
    iov: Iov,
}

impl Out {
    /// The next write of `o`: everything pending lent (`spare` takes the owned
    /// allocation's place meanwhile), its first segments in the iovecs.
    fn take(o: &mut trireme_core::buf::OutBuf, spare: Vec<u8>, mut iov: Iov) -> Out {
        iov.lent = o.lend(spare);
        let mut parts: [&[u8]; trireme_core::buf::WRITE_IOV] = Default::default();
        let n = iov.lent.chunks(&mut parts);
        let mut v = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; trireme_core::buf::WRITE_IOV];
        for (e, p) in v.iter_mut().zip(&parts[..n]) {
            *e = libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            };
        }
        (iov.iov, iov.n) = (v, n);
        Out { iov }
    }

    /// Back after the write: the lent bytes return to `o`; the spare and the iovec set go
    /// back to their pools.
    fn give_back(self, o: &mut trireme_core::buf::OutBuf) -> (Vec<u8>, Iov) {
        let mut iov = self.iov;
        iov.n = 0;
        let spare = o.unlend(std::mem::take(&mut iov.lent));
        (spare, iov)
    }
}

// SAFETY: the iovecs are on the heap (their address does not change while the value is
// moved or owned by the ring) and their first `n` entries are valid ranges into the lent
// output: the owned `Vec`'s allocation and the shared `Bytes`' buffers, heap memory that
// stays put while the `Lent` holding them is moved, and is not touched while the ring owns
// the value (the `Lent` is kept in it).
unsafe impl monoio::buf::IoVecBuf for Out {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.n
    }
}

/// One write of `out`: a single op type whatever it holds (the future sits in every
/// connection's task, so its size counts per idle connection).
async fn write_owned<W: AsyncWriteRent>(mut half: W, out: Out) -> (W, io::Result<usize>, Out) {
    let (r, out) = half.writev(out).await;
    (half, r, out)
}

/// Wait until the socket is readable, without a buffer (io_uring: a PollAdd).
async fn readable_owned(
    half: OwnedReadHalf<TcpStream>,
) -> (OwnedReadHalf<TcpStream>, io::Result<()>) {
    // SAFETY: `readable` takes `&self` and only submits a poll on the shared fd; the write
    // half's operations do not touch the read side (the premise of monoio's `Split`).
    let stream = unsafe { &*half.0.get() };
    let r = stream.readable(true).await;
    (half, r)
}

enum Ev {
    ClientReadable(OwnedReadHalf<TcpStream>, io::Result<()>),
    ClientRead(OwnedReadHalf<TcpStream>, io::Result<usize>, BytesMut),
    ClientWritten(OwnedWriteHalf<TcpStream>, io::Result<usize>, Out),
    UpRead(OwnedReadHalf<TcpStream>, io::Result<usize>, BytesMut),
    UpWritten(OwnedWriteHalf<TcpStream>, io::Result<usize>, Out),
    Connected(io::Result<TcpStream>),
    Timer,
    Drain,
    /// Another request's fetch this session waits on moved.
    Woken,
}

/// Poll an optional in-flight operation; a completed one is taken out of its slot.
fn poll_slot<F: Future>(
    slot: &mut std::pin::Pin<&mut Option<F>>,
    cx: &mut std::task::Context<'_>,
) -> Option<F::Output> {
    let f = slot.as_mut().as_pin_mut()?;
    match f.poll(cx) {
        Poll::Ready(v) => {
            slot.set(None);
            Some(v)
        }
        Poll::Pending => None,
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<ProxyContext>, local: &Local) {
    let may_wait = ctx.sessions_may_wait();
    let mut s = Session::new(ctx, peer, Instant::now());
    let wake_slot = local.bell.as_ref().filter(|_| may_wait).map(|b| {
        let slot = local.woken.borrow_mut().insert(Woken::default());
        let target: Arc<dyn Wake> = b.clone();
        s.set_waker(CoreWaker::new(target, slot as u64));
        slot
    });
    let cfd = stream.as_raw_fd();
    let mut idle_slot: Option<IdleSlot> = None;
    let (crd, cwr) = stream.into_split();
    // A half is `None` while an operation in flight owns it.
    let (mut crd, mut cwr) = (Some(crd), Some(cwr));
    let mut urd: Option<OwnedReadHalf<TcpStream>> = None;
    let mut uwr: Option<OwnedWriteHalf<TcpStream>> = None;
    let mut ufd: RawFd = -1;
    // The session's name for the upstream I/O (from its latest `Connect`; in-flight
    // operations of a released one are dropped, so every completion is about this one).
    let mut uio = IoId::default();
    let mut umeta = ConnMeta {
        created: Instant::now(),
        requests: 0,
    };

    let mut cread = pin!(None);
    let mut cwait = pin!(None);
    // Readiness seen while idle: the next read takes a buffer.
    let mut client_ready = false;
    let mut cwrite = pin!(None);
    let mut uread = pin!(None);
    let mut uwrite = pin!(None);
    let mut connecting = pin!(None);
    let far = monoio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let mut sleep = pin!(monoio::time::sleep_until(far));
    let mut timer = TimerSlot::default();
    let drain_slot = local.drain.wakers.borrow_mut().insert(None);
    let mut draining = false;
    // The time an event was handled at stands for the turn of the loop that follows it
    // (no wait comes between): one clock read per event.
    let mut now = Instant::now();

    loop {
        while let Some(a) = s.poll_action() {
            match a {
                Action::Connect {
                    io,
                    upstream,
                    backend,
                    addr,
                    fresh,
                } => {
                    // Any previous connection was released; make sure nothing of it flies.
                    uio = io;
                    uread.set(None);
                    uwrite.set(None);
                    connecting.set(None);
                    (urd, uwr) = (None, None);
                    let pooled = if fresh {
                        None
                    } else {
                        local.take_pooled(upstream, backend, now)
                    };
                    match pooled {
                        Some((c, meta)) => {
                            (urd, uwr, ufd, umeta) = (Some(c.rd), Some(c.wr), c.fd, meta);
                            s.on_upstream_connected(uio, true, now);
                        }
                        // Boxed: connects are rare on pooled connections, and the
                        // future is large to carry inline in every idle connection.
                        None => connecting.set(Some(Box::pin(TcpStream::connect_addr(addr)))),
                    }
                }
                Action::ReleaseUpstream {
                    io: _,
                    upstream,
                    backend,
                    reuse,
                } => {
                    connecting.set(None);
                    let home = uread.is_none() && uwrite.is_none();
                    match (urd.take(), uwr.take()) {
                        (Some(rd), Some(wr)) if reuse && home => {
                            let c = UpConn { rd, wr, fd: ufd };
                            // One refused by the pool is dropped here, which closes it.
                            let _ = local.pools.borrow_mut()[upstream as usize].release(
                                backend as usize,
                                c,
                                umeta,
                                true,
                                now,
                            );
                        }
                        _ => {
                            uread.set(None);
                            uwrite.set(None);
                        }
                    }
                }
            }
        }

        // Start writes.
        if cwrite.is_none() && s.has_client_output() {
            if let Some(h) = cwr.take() {
                let out = Out::take(
                    s.client_output(),
                    local.bufs.borrow_mut().out_buf(),
                    local.iov(),
                );
                cwrite.set(Some(write_owned(h, out)));
            }
        }
        if uwrite.is_none() && s.has_upstream_output() {
            if let Some(h) = uwr.take() {
                let out = Out::take(
                    s.upstream_output(),
                    local.bufs.borrow_mut().out_buf(),
                    local.iov(),
                );
                uwrite.set(Some(write_owned(h, out)));
            }
        }
        if s.wants_close() && cwrite.is_none() {
            break;
        }
        // Start reads.
        if cread.is_none() && cwait.is_none() && s.wants_client_read() {
            if let Some(h) = crd.take() {
                if !client_ready && s.client_read_can_wait() {
                    // Nothing waits for these bytes yet (a next request, the close): no
                    // buffer until they arrive, so an idle connection holds none.
                    cwait.set(Some(readable_owned(h)));
                } else {
                    client_ready = false;
                    let b = local.bufs.borrow_mut().read_buf(READ_CHUNK);
                    cread.set(Some(read_owned(h, b)));
                }
            }
        }
        if uread.is_none() && s.wants_upstream_read() {
            if let Some(h) = urd.take() {
                let b = local.bufs.borrow_mut().read_buf(UP_READ_CHUNK);
                uread.set(Some(read_owned(h, b)));
            }
        }
        s.park_buffers(&mut local.bufs.borrow_mut());
        // An idle connection may make room at the limit.
        local
            .idle
            .borrow_mut()
            .track(&mut idle_slot, s.is_idle(), cfd);
        if let Some(d) = timer.rearm(&s) {
            sleep.as_mut().reset(monoio::time::Instant::from_std(d));
        }

        let ev = poll_fn(|cx| {
            if let Some((h, r, out)) = poll_slot(&mut cwrite, cx) {
                return Poll::Ready(Ev::ClientWritten(h, r, out));
            }
            if let Some((h, r, out)) = poll_slot(&mut uwrite, cx) {
                return Poll::Ready(Ev::UpWritten(h, r, out));
            }
            if let Some((h, r, b)) = poll_slot(&mut uread, cx) {
                return Poll::Ready(Ev::UpRead(h, r, b));
            }
            if let Some((h, r, b)) = poll_slot(&mut cread, cx) {
                return Poll::Ready(Ev::ClientRead(h, r, b));
            }
            if let Some((h, r)) = poll_slot(&mut cwait, cx) {
                return Poll::Ready(Ev::ClientReadable(h, r));
            }
            if let Some(r) = poll_slot(&mut connecting, cx) {
                return Poll::Ready(Ev::Connected(r));
            }
            if timer.armed().is_some() && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Timer);
            }
            if !draining && local.drain.poll(drain_slot, cx).is_ready() {
                return Poll::Ready(Ev::Drain);
            }
            if let Some(slot) = wake_slot {
                if poll_woken(local, slot, cx).is_ready() {
                    return Poll::Ready(Ev::Woken);
                }
            }
            Poll::Pending
        })
        .await;

        now = Instant::now();
        match ev {
            Ev::ClientWritten(h, r, out) => {
                cwr = Some(h);
                let (spare, iov) = out.give_back(s.client_output());
                local.bufs.borrow_mut().put_out(spare);
                local.iovs.borrow_mut().push(iov);
                match r {
                    Ok(n) if n > 0 => s.on_client_written(n, now),
                    _ => s.on_client_error(now),
                }
            }
            Ev::UpWritten(h, r, out) => {
                uwr = Some(h);
                let (spare, iov) = out.give_back(s.upstream_output());
                local.bufs.borrow_mut().put_out(spare);
                local.iovs.borrow_mut().push(iov);
                match r {
                    Ok(n) if n > 0 => s.on_upstream_written(uio, n, now),
                    _ => s.on_upstream_eof(uio, true, now),
                }
            }
            Ev::UpRead(h, r, b) => {
                urd = Some(h);
                match r {
                    Ok(0) => {
                        local.bufs.borrow_mut().put_read(b);
                        s.on_upstream_eof(uio, false, now);
                    }
                    Ok(_) => {
                        s.put_upstream_bytes(b, &mut local.bufs.borrow_mut());
                        s.on_upstream_read(uio, now);
                    }
                    Err(_) => {
                        local.bufs.borrow_mut().put_read(b);
                        s.on_upstream_eof(uio, true, now);
                    }
                }
            }
            Ev::ClientReadable(h, r) => {
                crd = Some(h);
                match r {
                    Ok(()) => client_ready = true,
                    Err(_) => s.on_client_error(now),
                }
            }
            Ev::ClientRead(h, r, b) => {
                crd = Some(h);
                match r {
                    Ok(0) => {
                        local.bufs.borrow_mut().put_read(b);
                        s.on_client_eof(now);
                    }
                    Ok(_) => {
                        s.put_client_bytes(b, &mut local.bufs.borrow_mut());
                        s.on_client_read(now);
                    }
                    Err(_) => {
                        local.bufs.borrow_mut().put_read(b);
                        s.on_client_error(now);
                    }
                }
            }
            Ev::Connected(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                ufd = stream.as_raw_fd();
                let (rd, wr) = stream.into_split();
                (urd, uwr) = (Some(rd), Some(wr));
                umeta = ConnMeta {
                    created: now,
                    requests: 0,
                };
                s.on_upstream_connected(uio, false, now);
            }
            Ev::Connected(Err(e)) => {
                tracing::debug!(error = %e, "upstream connect failed");
                s.on_upstream_connect_failed(uio, now);
            }
            Ev::Timer => {
                sleep.as_mut().reset(far);
                timer.fire(&mut s, now);
            }
            Ev::Drain => {
                draining = true;
                s.begin_drain(now);
            }
            Ev::Woken => s.on_wake(now),
        }
    }

    local.drain.wakers.borrow_mut().remove(drain_slot);
    if let Some(slot) = wake_slot {
        local.woken.borrow_mut().remove(slot);
    }
    // Out of the idle list before the descriptor closes (the acceptor may shut down only
    // descriptors in it).
    if let Some(slot) = idle_slot {
        local.idle.borrow_mut().leave(slot);
    }
    // Close: the client gets a FIN; reads still in flight are cancelled with their futures.
    cread.set(None);
    cwait.set(None);
    uread.set(None);
    uwrite.set(None);
    if let Some(mut h) = cwr.take() {
        let _ = h.shutdown().await;
    }
    s.recycle(&mut local.bufs.borrow_mut());
}
