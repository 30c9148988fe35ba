//! One client connection's proxy session: a pure state machine.
//!
//! # Driving a session
//!
//! The runtime owns the sockets and the clock; the session owns the buffers and every
//! decision. After each input, the runtime drains the session's output:
//!
//! 1. Input: read client bytes into the buffer [`Session::reserve_client_in`] returns (or
//!    hand over a buffer read into, [`Session::put_client_bytes`]) then call
//!    [`Session::on_client_read`]; likewise [`Session::reserve_up_in`] and
//!    [`Session::on_upstream_read`]. Report EOF, errors, connect outcomes and timer expiry
//!    with the other `on_*` methods, always passing `now`; upstream completions name the
//!    I/O they are about ([`IoId`], from the [`Action::Connect`] that asked for it).
//! 2. Output, pulled: [`Session::poll_action`] until `None` (connect to a backend, release
//!    the upstream connection to the pool or close it); write what
//!    [`Session::client_output`] and [`Session::upstream_output`] hold (while
//!    [`Session::has_client_output`] / [`Session::has_upstream_output`]) and report progress
//!    with `on_*_written`; read only while [`Session::wants_client_read`] /
//!    [`Session::wants_upstream_read`]; arm one timer at [`Session::deadline`]; close the
//!    client when [`Session::wants_close`].
//!
//! The buffers are the session's: a runtime reaches them only through these calls, so a
//! transport (TLS) or another framing (HTTP/2) can sit between the socket and the parser
//! without the runtimes changing.
//!
//! Requests on one connection are handled one at a time, in order: pipelined requests wait
//! in the input buffer until the response before them is complete. Bodies stream through in
//! both directions with a bounded amount buffered (backpressure through `wants_*_read`).
//!
//! After a client protocol error the read side stays failed: the error response is written
//! and the connection closes.

use crate::balance::{Algorithm, PickInput};
use crate::buf::{BufPool, OutBuf};
use crate::cache::http::{write_hit, Capture, HitReply, Lookup, Pending, Refresh, Served};
use crate::cache::store::Stored;
use crate::error::{HttpError, Status};
use crate::forward::{ForwardFields, Peer};
use crate::http1::body::{Chunk, ChunkedDecoder};
use crate::http1::head::{self, Method, Parsed, RequestHead, ResponseHead};
use crate::http1::response::ResponseReader;
use crate::http1::server::ServerConn;
use crate::http1::write::{error_response, push_chunk, push_content_length, push_dec, LAST_CHUNK};
use crate::http1::{BodyKind, Limits, Version};
use crate::metrics::Metrics;
use crate::respond::{push_header, CaptureStage, ClientBody, Framing, ResponsePlan, Runs};
use crate::route::Router;
use crate::upstream::{AttemptState, HashKey, Upstream};
use bytes::{Buf, BytesMut};
use smallvec::SmallVec;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buffered bytes beyond which the session stops reading from the other side.
pub const HIGH_WATER: usize = 64 * 1024;
/// Read buffer space the runtime should keep available for client reads.
pub const READ_CHUNK: usize = 16 * 1024;
/// Read buffer space for upstream reads: a 16 KiB response and its head in one read.
pub const UP_READ_CHUNK: usize = 32 * 1024;

/// Everything a session needs that is shared by all sessions of a process.
pub struct ProxyContext {
    pub limits: Limits,
    /// A client must send a whole request head within this time.
    pub header_timeout: Duration,
    /// Idle time allowed between requests on a keep-alive client connection.
    pub keep_alive_timeout: Duration,
    /// Inactivity allowed while a request or response body is in flight (`server.timeout`).
    pub idle_timeout: Duration,
    pub max_requests_per_connection: u32,
    pub upstreams: Vec<Arc<Upstream>>,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    /// Name in the `Via` header.
    pub via_name: String,
    /// Converts `now` to wall-clock time for HTTP dates.
    pub clock: crate::cache::WallClock,
    /// The shared HTTP cache, when configured.
    pub cache: Option<Arc<crate::cache::HttpCache>>,
    /// Clients whose forwarding fields (`X-Forwarded-For`, `Forwarded`, ...) are kept.
    pub trusted_proxies: crate::forward::TrustedProxies,
    /// Empty path segments are dropped when the target is normalised (`//` as `/`).
    pub merge_slashes: bool,
    /// Forward `TRACE` (off: 405, as nginx answers).
    pub allow_trace: bool,
    /// The whole request body must arrive within this time of its head (408 otherwise).
    pub body_timeout: Duration,
    /// Request bodies up to this size are received whole before a backend is involved.
    pub body_buffer: usize,
    /// Connections open per client address (`server.max_connections_per_ip`), if bounded.
    pub per_ip: Option<Arc<crate::admission::PerIp>>,
    /// An admin listener's context ([`crate::admin::context`]): its requests are answered
    /// by the admin endpoints, not proxied.
    pub admin: Option<Arc<crate::admin::Admin>>,
    /// The listener terminates TLS: every client connection gets this transport.
    pub tls: Option<crate::tls::TlsAcceptor>,
}

impl ProxyContext {
    /// Whether a session may wait on another request's fetch (collapsed forwarding, the
    /// cache lock): only with a cache. A runtime gives sessions a waker
    /// ([`Session::set_waker`]) only then.
    pub fn sessions_may_wait(&self) -> bool {
        self.cache.is_some()
    }
}

/// Names one upstream I/O of a session (a backend connection, an L2 connection): the
/// [`Action::Connect`] that asks for it says which, and every completion about it
/// (`on_upstream_*`) passes it back, so a completion for I/O the session has let go is
/// caught instead of being taken for the current one (and, later, one client connection can
/// hold several).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IoId(u32);

/// What the session asks of the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Get a connection to this backend for I/O `io`: an idle pooled one if `fresh` is
    /// false and the pool has one, else a new one. Answer with
    /// [`Session::on_upstream_connected`] or [`Session::on_upstream_connect_failed`]. Any
    /// previous upstream connection was released before this.
    Connect {
        io: IoId,
        upstream: u16,
        backend: u16,
        addr: SocketAddr,
        fresh: bool,
    },
    /// The session is done with the upstream connection of `io`: return it to the pool
    /// (`reuse`) or close it.
    ReleaseUpstream {
        io: IoId,
        upstream: u16,
        backend: u16,
        reuse: bool,
    },
}

/// Every deadline a session can arm ([`Session::each_timer`]), in the order
/// [`Session::on_timeout`] handles them when several are due, and what each expiry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// An L2 (Redis) lookup's bound: it fails, the request goes on without L2.
    L2,
    /// A small request body buffered before any backend is involved, late or idle: 408.
    BodyBuffer,
    /// A request waiting on another's fetch of its key (the cache lock): look again (a poll
    /// without a waker; the end of the wait, `lock_timeout`, with one).
    CacheWait,
    /// Waiting for a request head (the first, a started one, or keep-alive idle): 408 for
    /// a started head, else the connection closes.
    Head,
    /// Connecting to a backend (`connect_timeout`): retry elsewhere, or 502/504.
    Connect,
    /// Waiting on the backend's response (`response_timeout`): 504.
    Response,
    /// The client idles while its body is read or its response written (`server.timeout`):
    /// 408 before any of the response went out, else the connection is cut.
    ClientIdle,
    /// The whole request body within `client_body_timeout` of its head: as `ClientIdle`.
    RequestBody,
    /// Streaming another request's fetch: look at the growing body (a poll without a
    /// waker; a bound on a stalled fetch with one).
    Follow,
    /// Writing a final (error) response the client does not read: close.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for (the rest of) a request head.
    Idle,
    /// A request is in flight.
    Active,
    /// Writing a final response (usually an error), then closing.
    Closing,
    /// Close now: nothing more will be written.
    Closed,
}

#[derive(Debug)]
enum ReqBody {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Up {
    None,
    Connecting { since: Instant, fresh: bool },
    Connected { reused: bool },
}

/// The cache's part in the request in flight.
#[derive(Debug)]
enum CacheReq {
    None,
    Miss(Box<Pending>),
    Invalidate { key: Vec<u8>, host: Vec<u8> },
}

/// The request in flight.
#[derive(Debug)]
struct Req {
    cache: CacheReq,
    method: Method,
    version: Version,
    has_body: bool,
    upstream: u16,
    /// Its attempts on the upstream's backends: the one in flight, those tried, the retry
    /// budget and the stale-connection retry (the rules any origin exchange follows).
    attempts: AttemptState,
    /// The client has been sent (part of) a final response head.
    response_started: bool,
    /// When the request head was complete: the whole body must arrive within
    /// `client_body_timeout` of it.
    body_since: Instant,
    /// Where that response begins in the client's output stream
    /// ([`OutBuf::end_offset`]): while no byte from there has gone out, it can still give
    /// way to an error response.
    resp_at: u64,
    /// Bytes of the response received from the backend (retry only before any).
    resp_bytes: u64,
    /// Client connection closes after this exchange.
    close_after: bool,
    hash_key: SmallVec<[u8; 64]>,
    has_hash_key: bool,
}

pub struct Session {
    ctx: Arc<ProxyContext>,
    /// The client, and whether its forwarding fields are believed.
    peer: Peer,
    /// The client connection: its buffers, transport, keep-alive and head-timer state.
    conn: ServerConn,
    /// Bytes read from the current upstream connection, not yet consumed.
    up_in: BytesMut,
    /// Bytes to write to the current upstream connection.
    up_out: OutBuf,
    /// The actions the runtime has not taken yet: at most a release and then a connect
    /// (a release while a connect is unseen withdraws the connect, and a connect comes only
    /// after the previous connection's release), so two slots and no queue to allocate.
    release: Option<Action>,
    connect: Option<Action>,
    state: State,
    req: Option<Req>,
    req_body: ReqBody,
    /// The response in flight, as read off the backend connection.
    resp: ResponseReader,
    /// How its body is delimited for the client.
    resp_framing: Framing,
    up: Up,
    /// The upstream I/O asked for last (the current one while `up` is not `None`).
    up_io: IoId,
    /// The last [`IoId`] handed out.
    io_seq: u32,
    /// The upstream request head, kept for a retry.
    up_head: Vec<u8>,
    /// A complete head whose (small) body is being buffered before any backend is
    /// involved: since when.
    body_wait: Option<Instant>,
    last_up_io: Instant,
    /// The buffers are back in the runtime's [`BufPool`] (idle connection).
    parked: bool,
    /// The response in flight is being copied into the cache.
    capture: Option<Box<Capture>>,
    /// Where the answer comes from when it is not the origin's connection or written at
    /// once: what the exchange waits on.
    source: Source,
    /// `requests_done` when the latest L2 lookup ended, and whether it was a hit.
    l2_tried: Option<(u32, bool)>,
    /// How the runtime is told that a fetch this session waits on moved (else it polls).
    waker: Option<crate::wake::Waker>,
}

/// Where the answer to the parsed request comes from, when not from the origin through the
/// upstream I/O slot (`up`) or written at once (a generated response, a cache hit): the one
/// thing the session waits on, so no two waits can overlap and no call has to ask which of
/// several optional sub-machines is live. While one of the first three runs, the request
/// head stays in the input (the session is `Idle` with a head pending) and is processed
/// again when it ends.
#[derive(Debug, Default)]
enum Source {
    /// The origin, or nothing to wait for.
    #[default]
    Direct,
    /// The cache lock: another request's fetch of the same key is awaited.
    CacheLock(CacheWait),
    /// An L2 (Redis) lookup in flight on the upstream I/O slot.
    L2(Box<l2::L2Fetch>),
    /// After an L2 miss: the request's pending fetch (still leading the key), taken up
    /// again by `start_request`.
    AfterL2(Box<Pending>),
    /// The response streams from another request's fetch (collapsed forwarding).
    Follow(Box<follow::Follow>),
}

#[derive(Clone, Copy, Debug)]
struct CacheWait {
    since: Instant,
    next: Instant,
}

/// Start the request's next attempt on `upstream` (see [`AttemptState::begin`]): the
/// client's address and the request's hash key are the balancer's input.
fn begin_attempt(
    req: &mut Req,
    client: IpAddr,
    upstream: &Upstream,
    now: Instant,
) -> Option<usize> {
    let mut ipb = [0u8; 16];
    let client: &[u8] = match client {
        IpAddr::V4(a) => {
            ipb[..4].copy_from_slice(&a.octets());
            &ipb[..4]
        }
        IpAddr::V6(a) => {
            ipb.copy_from_slice(&a.octets());
            &ipb[..]
        }
    };
    let input = PickInput {
        client,
        key: req.has_hash_key.then_some(&req.hash_key[..]),
    };
    req.attempts.begin(upstream, &input, now)
}

fn put_bytes(into: &mut BytesMut, buf: BytesMut, pool: &mut BufPool) {
    if into.is_empty() {
        pool.put_read(std::mem::replace(into, buf));
    } else {
        into.extend_from_slice(&buf);
        pool.put_read(buf);
    }
}

/// A runtime called the session in a state where the call means nothing (a completion for
/// I/O the session never asked for, more bytes written than were pending). A bug in the
/// caller: debug builds (tests, the simulator, the fuzz targets) stop at it; release builds
/// count it (`trireme_api_misuse_total`) and ignore the call.
#[track_caller]
fn misuse(what: &'static str) {
    debug_assert!(false, "session API misuse: {what}");
    MISUSE.fetch_add(1, Ordering::Relaxed);
    tracing::error!(what, "session API misuse (a runtime bug); call ignored");
}

/// Calls ignored as API misuse (see `misuse`), process-wide.
pub static MISUSE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Session {
    pub fn new(ctx: Arc<ProxyContext>, client: SocketAddr, now: Instant) -> Self {
        ctx.metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        ctx.metrics
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        let mut s = Session {
            peer: ctx.trusted_proxies.peer(client.ip()),
            ctx,
            conn: ServerConn::new(now),
            up_in: BytesMut::new(),
            up_out: OutBuf::new(),
            release: None,
            connect: None,
            state: State::Idle,
            req: None,
            req_body: ReqBody::Done,
            resp: ResponseReader::done(),
            resp_framing: Framing::NoBody,
            up: Up::None,
            up_io: IoId(0),
            io_seq: 0,
            up_head: Vec::new(),
            body_wait: None,
            last_up_io: now,
            parked: false,
            capture: None,
            source: Source::Direct,
            l2_tried: None,
            waker: None,
        };
        if let Some(tls) = &s.ctx.tls {
            s.peer.https = true;
            s.conn.set_transport(tls.transport());
        }
        if s.ctx.admin.as_ref().is_some_and(|a| !a.opened()) {
            // Past admin.max_connections: answered at once, then closed.
            s.reply_error(Status::ServiceUnavailable, true, now);
        }
        s
    }

    // ----------------------------------------------------------------- output, pulled

    /// How to reach this session when another request's fetch it waits on (collapsed
    /// forwarding, the cache lock) moves: the runtime then calls [`on_wake`](Self::on_wake)
    /// on the session's worker. Without one, a waiting session looks again every
    /// [`WAIT_POLL`](crate::cache::http::WAIT_POLL) (its [`deadline`](Self::deadline)).
    pub fn set_waker(&mut self, w: crate::wake::Waker) {
        self.waker = Some(w);
    }

    /// The fetch this session waits on moved (see [`set_waker`](Self::set_waker)). A wake-up
    /// that finds nothing to do (the session stopped waiting meanwhile) is harmless.
    pub fn on_wake(&mut self, now: Instant) {
        let m = &self.ctx.metrics;
        match &mut self.source {
            Source::Follow(_) => {
                m.waiter_wakeups.fetch_add(1, Ordering::Relaxed);
                self.pump_follow(now);
            }
            Source::CacheLock(w) => {
                m.waiter_wakeups.fetch_add(1, Ordering::Relaxed);
                w.next = now;
                if self.state == State::Idle {
                    self.process_client(now);
                }
            }
            Source::Direct | Source::L2(_) | Source::AfterL2(_) => {}
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        // Looked at before taken: the runtime asks after every call, and a `take` of an
        // empty slot still copies it.
        if self.release.is_some() {
            self.release.take()
        } else if self.connect.is_some() {
            self.connect.take()
        } else {
            None
        }
    }

    /// What to write to the client: write from [`OutBuf::pending_parts`] (or lend it,
    /// [`OutBuf::lend`]) and report with [`on_client_written`](Self::on_client_written).
    #[inline]
    pub fn client_output(&mut self) -> &mut OutBuf {
        let closing = self.state == State::Closing;
        self.conn.write_target(closing)
    }

    /// Bytes wait to be written to the client.
    #[inline]
    pub fn has_client_output(&self) -> bool {
        self.conn.has_output(self.state == State::Closing)
    }

    /// Put `transport` (TLS) between the client's socket and this session, before any byte
    /// is read: the runtime's reads ([`reserve_client_in`](Self::reserve_client_in),
    /// [`put_client_bytes`](Self::put_client_bytes)) then go to the transport and its
    /// writes ([`client_output`](Self::client_output)) come from it; the calls are the same.
    pub fn set_transport(&mut self, transport: Box<dyn crate::transport::Transport>) {
        self.conn.set_transport(transport);
    }

    /// What to write to the upstream connection (see [`client_output`](Self::client_output));
    /// report with [`on_upstream_written`](Self::on_upstream_written).
    #[inline]
    pub fn upstream_output(&mut self) -> &mut OutBuf {
        &mut self.up_out
    }

    /// Bytes wait to be written to the upstream connection.
    #[inline]
    pub fn has_upstream_output(&self) -> bool {
        !self.up_out.is_empty()
    }

    /// Ensure the client input buffer has room for a read of at least [`READ_CHUNK`] bytes,
    /// taking the session's buffers from `pool` if it had parked them; the runtime reads into
    /// its spare capacity, then calls [`on_client_read`](Self::on_client_read).
    pub fn reserve_client_in(&mut self, pool: &mut BufPool) -> &mut BytesMut {
        self.unpark(pool);
        self.conn.reserve_read()
    }

    /// Ensure the upstream input buffer has room for a read of at least [`UP_READ_CHUNK`]
    /// bytes (then [`on_upstream_read`](Self::on_upstream_read)).
    pub fn reserve_up_in(&mut self, pool: &mut BufPool) -> &mut BytesMut {
        self.unpark(pool);
        self.up_in.reserve(UP_READ_CHUNK);
        &mut self.up_in
    }

    /// For runtimes whose reads own their buffer (io_uring): hand over bytes read from the
    /// client, then call [`on_client_read`](Self::on_client_read). `buf` becomes the input
    /// buffer when nothing was buffered (no copy), else it is appended and pooled.
    pub fn put_client_bytes(&mut self, buf: BytesMut, pool: &mut BufPool) {
        self.unpark(pool);
        put_bytes(self.conn.read_target(), buf, pool);
    }

    /// As [`put_client_bytes`](Self::put_client_bytes), from the upstream connection.
    pub fn put_upstream_bytes(&mut self, buf: BytesMut, pool: &mut BufPool) {
        self.unpark(pool);
        put_bytes(&mut self.up_in, buf, pool);
    }

    fn unpark(&mut self, pool: &mut BufPool) {
        if self.parked {
            self.parked = false;
            self.conn.unpark(pool);
            if self.up_in.capacity() == 0 {
                self.up_in = pool.read_buf(UP_READ_CHUNK);
            }
            if self.up_out.capacity() == 0 {
                self.up_out.set_vec(pool.out_buf());
            }
            if self.up_head.capacity() == 0 {
                self.up_head = pool.out_buf();
            }
        }
    }

    /// Between requests, give the buffers back to `pool` (the four I/O buffers and the
    /// copy of the last upstream request head): an idle keep-alive connection then holds
    /// none. Does nothing while anything is buffered or a request is in flight.
    /// The runtime calls this when it stops driving the session for now.
    pub fn park_buffers(&mut self, pool: &mut BufPool) {
        if self.state != State::Idle
            || self.up != Up::None
            || self.is_l2()
            // (With shared body bytes still in a write, the runtime parks again once the
            // write is back.)
            || !self.conn.can_park()
            || !self.up_in.is_empty()
            || !self.up_out.is_empty()
        {
            return;
        }
        self.give_back(pool);
        self.parked = true;
    }

    /// The connection is closed: return every buffer to `pool`.
    pub fn recycle(mut self, pool: &mut BufPool) {
        self.give_back(pool);
    }

    fn give_back(&mut self, pool: &mut BufPool) {
        self.conn.give_back(pool);
        pool.put_read(std::mem::take(&mut self.up_in));
        pool.put_out(self.up_out.take_vec());
        let mut head = std::mem::take(&mut self.up_head);
        head.clear();
        pool.put_out(head);
    }

    /// The runtime should read from the client now.
    pub fn wants_client_read(&self) -> bool {
        match self.state {
            State::Idle => {
                let room = match self.body_wait {
                    Some(_) => self.ctx.limits.max_head + self.ctx.body_buffer + 8,
                    None => self.ctx.limits.max_head + 8,
                };
                !self.conn.eof && self.conn.input.len() < room
            }
            State::Active => {
                if self.conn.eof {
                    return false;
                }
                if matches!(self.req_body, ReqBody::Done) {
                    // Pipelined bytes: hold at most one head's worth.
                    self.conn.input.len() < self.ctx.limits.max_head
                } else {
                    self.up_out.len() < HIGH_WATER && self.conn.input.len() < HIGH_WATER
                }
            }
            State::Closing | State::Closed => false,
        }
    }

    /// Between requests with nothing buffered: the next client bytes start a new request.
    /// Completion-based runtimes wait for readiness first here, so an idle connection does
    /// not tie up a read buffer.
    pub fn awaiting_request(&self) -> bool {
        self.state == State::Idle && self.conn.input_is_empty() && !self.conn.eof
    }

    /// A client read now would only take bytes nothing waits for yet: the next request
    /// (idle, or pipelined behind the one in flight whose body is complete) or the
    /// client's close. Completion-based runtimes wait for readiness first then, instead
    /// of lending a read buffer that an idle keep-alive connection would keep.
    pub fn client_read_can_wait(&self) -> bool {
        !self.conn.eof
            && match self.state {
                State::Idle => self.body_wait.is_none(),
                State::Active => matches!(self.req_body, ReqBody::Done),
                State::Closing | State::Closed => false,
            }
    }

    /// Waiting for a request with nothing to write: a connection that may be closed to
    /// admit a new one at `max_connections` ([`crate::admission::IdleList`]).
    pub fn is_idle(&self) -> bool {
        // An admin connection makes no room for the proxy's: it has its own bound.
        self.awaiting_request() && !self.conn.has_output(false) && self.ctx.admin.is_none()
    }

    /// The runtime should read from the upstream connection now.
    pub fn wants_upstream_read(&self) -> bool {
        if let Source::L2(f) = &self.source {
            return f.connected;
        }
        matches!(self.up, Up::Connected { .. })
            && !self.resp.is_done()
            && !self.conn.output.has_shared()
            && self.conn.out_len() < HIGH_WATER
            && self.up_in.len() < HIGH_WATER
    }

    /// The client connection should be closed now (its output is flushed or abandoned).
    pub fn wants_close(&self) -> bool {
        self.state == State::Closed || (self.state == State::Closing && !self.conn.has_output(true))
    }

    /// The one deadline the runtime should arm; call [`on_timeout`](Self::on_timeout) then:
    /// the earliest of the timers armed now (`each_timer`, the timer table).
    pub fn deadline(&self) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        self.each_timer(|_, t| d = Some(d.map_or(t, |x| x.min(t))));
        d
    }

    /// The session's timer table: every deadline armed in the current state, with what it is
    /// for ([`Timer`] says what each expiry does), handed to `push`. The one place deadlines
    /// are derived: [`deadline`](Self::deadline) takes the earliest,
    /// [`on_timeout`](Self::on_timeout) handles the first due one in [`Timer`] order.
    #[inline]
    fn each_timer(&self, mut push: impl FnMut(Timer, Instant)) {
        let c = &self.ctx;
        match self.state {
            State::Idle if self.is_l2() => {
                if let Some(d) = self.l2_deadline() {
                    push(Timer::L2, d);
                }
            }
            State::Idle if matches!(self.source, Source::CacheLock(_)) => {
                if let Source::CacheLock(w) = &self.source {
                    push(Timer::CacheWait, w.next);
                }
            }
            State::Idle if self.body_wait.is_some() => {
                if let Some(since) = self.body_wait {
                    let d = (since + c.body_timeout).min(self.conn.last_io + c.idle_timeout);
                    push(Timer::BodyBuffer, d);
                }
            }
            State::Idle => push(
                Timer::Head,
                self.conn
                    .head_deadline(c.header_timeout, c.keep_alive_timeout),
            ),
            State::Active => {
                let up = self.current_upstream();
                match self.up {
                    Up::Connecting { since, .. } => {
                        push(Timer::Connect, since + up.cfg.connect_timeout)
                    }
                    Up::Connected { .. } if !self.resp.is_done() => {
                        push(Timer::Response, self.last_up_io + up.cfg.response_timeout)
                    }
                    _ => {}
                }
                let body_open = !matches!(self.req_body, ReqBody::Done);
                if body_open || self.conn.has_output(false) {
                    push(Timer::ClientIdle, self.conn.last_io + c.idle_timeout);
                }
                if let Some(r) = self.req.as_ref().filter(|_| body_open) {
                    push(Timer::RequestBody, r.body_since + c.body_timeout);
                }
                if let Source::Follow(f) = &self.source {
                    if self.conn.out_len() < HIGH_WATER {
                        push(Timer::Follow, f.next);
                    }
                }
            }
            State::Closing => push(Timer::Closing, self.conn.last_io + c.idle_timeout),
            State::Closed => {}
        }
    }

    // ----------------------------------------------------------------- client input

    /// New bytes were appended to `client_in`.
    pub fn on_client_read(&mut self, now: Instant) {
        if let Err(e) = self.conn.received(now) {
            tracing::debug!(client = %self.peer.ip, error = %e, "client transport failed; closing");
            self.abort(now);
            // The transport's last bytes (its alert) go out before the close.
            self.state = State::Closing;
            return;
        }
        self.process_client(now);
    }

    /// Convenience for tests and simulators: append and process.
    pub fn feed_client(&mut self, data: &[u8], now: Instant) {
        self.conn.read_target().extend_from_slice(data);
        self.on_client_read(now);
    }

    pub fn on_client_written(&mut self, n: usize, now: Instant) {
        let before = self.conn.out_len();
        if !self.conn.written(n, now) {
            misuse("on_client_written: more bytes than were pending");
        }
        if matches!(self.source, Source::Follow(_)) {
            self.pump_follow(now);
        }
        // A pipelined request held back by the output (see `process_client`).
        if before >= HIGH_WATER
            && self.conn.out_len() < HIGH_WATER
            && self.state == State::Idle
            && !self.conn.input.is_empty()
        {
            self.process_client(now);
        }
    }

    /// The client closed its sending side.
    pub fn on_client_eof(&mut self, now: Instant) {
        self.conn.eof = true;
        match self.state {
            State::Idle if matches!(self.source, Source::L2(_) | Source::CacheLock(_)) => {
                // A complete head waits on the cache: it is answered, then the connection
                // closes.
            }
            State::Idle if !self.conn.input.is_empty() => {
                // Requests held back while the last answer drains (or a partial head):
                // `process_client` answers the complete ones, then closes.
                self.process_client(now);
            }
            // Nothing to answer: close once the last answer is out.
            State::Idle => self.close_when_flushed(),
            State::Active => {
                if !matches!(self.req_body, ReqBody::Done) {
                    tracing::debug!(client = %self.peer.ip, "client closed during request body");
                    self.abort(now);
                }
                // Otherwise the response still goes out; the connection closes after it,
                // or after the requests pipelined before the half-close.
                if self.conn.input.is_empty() {
                    if let Some(r) = self.req.as_mut() {
                        r.close_after = true;
                    }
                    self.follow_close_after();
                }
            }
            State::Closing | State::Closed => {}
        }
    }

    /// Reading from or writing to the client failed: drop everything.
    pub fn on_client_error(&mut self, now: Instant) {
        self.conn.eof = true;
        self.abort(now);
    }

    /// Graceful shutdown: idle connections close now; a request in flight finishes and its
    /// response carries `Connection: close`.
    pub fn begin_drain(&mut self, _now: Instant) {
        self.conn.draining = true;
        if self.state == State::Idle && self.conn.input_is_empty() {
            self.state = State::Closed;
        }
        if let Some(r) = self.req.as_mut() {
            r.close_after = true;
        }
        self.follow_close_after();
    }

    // ----------------------------------------------------------------- upstream input

    pub fn on_upstream_connected(&mut self, io: IoId, reused: bool, now: Instant) {
        if !self.is_current(io, "on_upstream_connected for another I/O") {
            return;
        }
        if self.is_l2() {
            self.l2_connected(reused, now);
            return;
        }
        if !matches!(self.up, Up::Connecting { .. }) {
            return misuse("on_upstream_connected without a Connect in flight");
        }
        self.up = Up::Connected { reused };
        self.last_up_io = now;
        let m = &self.ctx.metrics;
        if reused {
            m.upstream_reuses.fetch_add(1, Ordering::Relaxed);
        } else {
            m.upstream_connects.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn on_upstream_connect_failed(&mut self, io: IoId, now: Instant) {
        if !self.is_current(io, "on_upstream_connect_failed for another I/O") {
            return;
        }
        if self.is_l2() {
            self.l2_fail("connect failed", now);
            return;
        }
        if !matches!(self.up, Up::Connecting { .. }) {
            return misuse("on_upstream_connect_failed without a Connect in flight");
        }
        self.connect_failed(now, false);
    }

    pub fn on_upstream_written(&mut self, io: IoId, n: usize, now: Instant) {
        if !self.is_current(io, "on_upstream_written for another I/O") {
            return;
        }
        if n > self.up_out.len() {
            misuse("on_upstream_written: more bytes than were pending");
        }
        self.up_out.consume(n);
        self.last_up_io = now;
    }

    /// New bytes were appended to `up_in`.
    pub fn on_upstream_read(&mut self, io: IoId, now: Instant) {
        if !self.is_current(io, "on_upstream_read for another I/O") {
            return;
        }
        self.last_up_io = now;
        if self.is_l2() {
            self.l2_read(now);
            return;
        }
        if !matches!(self.up, Up::Connected { .. }) {
            return misuse("on_upstream_read without a connected upstream");
        }
        if let Some(r) = self.req.as_mut() {
            r.resp_bytes += self.up_in.len() as u64;
        }
        self.process_upstream(now);
        // Writing the response may have freed the client for the next request.
    }

    pub fn feed_upstream(&mut self, io: IoId, data: &[u8], now: Instant) {
        self.up_in.extend_from_slice(data);
        self.on_upstream_read(io, now);
    }

    /// The backend closed the connection (or it failed: `error`).
    pub fn on_upstream_eof(&mut self, io: IoId, error: bool, now: Instant) {
        if !self.is_current(io, "on_upstream_eof for another I/O") {
            return;
        }
        if self.is_l2() {
            self.l2_fail("connection closed", now);
            return;
        }
        if !matches!(self.up, Up::Connected { .. }) {
            return misuse("on_upstream_eof without a connected upstream");
        }
        if self.resp.awaiting_head() {
            {
                let reused = matches!(self.up, Up::Connected { reused: true });
                let (retryable, no_bytes) = match &self.req {
                    Some(r) => (r.method.is_idempotent() && !r.has_body, r.resp_bytes == 0),
                    None => (false, false),
                };
                if retryable
                    && no_bytes
                    && reused
                    && !self
                        .req
                        .as_ref()
                        .is_some_and(|r| r.attempts.stale_retry_used())
                {
                    // A pooled connection the backend had already closed: not the backend's
                    // fault, and never the client's problem. Same backend, fresh connection.
                    self.ctx.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    self.release_upstream(false);
                    if !self.connect_again(now, true, false) {
                        self.reply_upstream_error(Status::BadGateway, now);
                    }
                    return;
                }
                if no_bytes && retryable {
                    // Closed without a byte of response: retry elsewhere like a connect
                    // failure.
                    self.connect_failed(now, false);
                    return;
                }
                self.report_backend_failure(now);
                self.upstream_error(
                    Status::BadGateway,
                    "backend closed the connection before a complete response head",
                    now,
                );
            }
            return;
        }
        if self.resp.is_done() {
            return;
        }
        let complete = !error && {
            let mut sink = ClientBody::new(&mut self.conn.output, self.resp_framing);
            self.resp.on_eof(&mut sink)
        };
        if complete {
            // A body read until close: the connection is spent.
            self.finish_exchange(false, now);
        } else {
            self.broken_response("backend closed the connection mid-response", now);
        }
    }

    /// The timer armed at [`deadline`](Self::deadline) fired (it may be stale: the session
    /// rechecks against `now`). Handles the first due timer of the table.
    pub fn on_timeout(&mut self, now: Instant) {
        let mut due: Option<Timer> = None;
        self.each_timer(|k, t| {
            if t <= now {
                due = Some(due.map_or(k, |d| d.min(k)));
            }
        });
        let Some(timer) = due else { return };
        match timer {
            Timer::L2 => self.l2_fail("timed out", now),
            Timer::BodyBuffer => {
                tracing::debug!(client = %self.peer.ip, "client request body timed out");
                self.body_wait = None;
                self.client_error(
                    HttpError::new(Status::RequestTimeout, "request body not received in time"),
                    now,
                );
            }
            Timer::CacheWait => {
                self.ctx
                    .metrics
                    .waiter_polls
                    .fetch_add(1, Ordering::Relaxed);
                // Look in the cache again (or, past the lock timeout, go to the backend).
                self.process_client(now);
            }
            Timer::Head => {
                if self.conn.head_started.is_some() || !self.conn.input_is_empty() {
                    tracing::debug!(client = %self.peer.ip, "client request head timed out");
                    self.client_error(
                        HttpError::new(Status::RequestTimeout, "request head not received in time"),
                        now,
                    );
                } else {
                    self.state = State::Closed;
                }
            }
            Timer::Connect => self.connect_failed(now, true),
            Timer::Response => {
                self.report_backend_failure(now);
                self.upstream_error(
                    Status::GatewayTimeout,
                    "backend did not respond in time",
                    now,
                );
            }
            Timer::ClientIdle | Timer::RequestBody => {
                let started = self.req.as_ref().is_some_and(|r| r.response_started);
                let following = matches!(self.source, Source::Follow(_));
                if !following && !started && !matches!(self.req_body, ReqBody::Done) {
                    self.release_upstream(false);
                    self.client_error(
                        HttpError::new(Status::RequestTimeout, "request body not received in time"),
                        now,
                    );
                } else {
                    tracing::debug!(client = %self.peer.ip, "client stalled; closing");
                    self.abort(now);
                }
            }
            Timer::Follow => {
                self.ctx
                    .metrics
                    .waiter_polls
                    .fetch_add(1, Ordering::Relaxed);
                self.pump_follow(now);
            }
            Timer::Closing => {
                // The client does not read its error response: give up on it.
                self.conn.clear_output();
                self.state = State::Closed;
            }
        }
        // An expiry that leaves its own timer due would have the runtime spin on it.
        #[cfg(debug_assertions)]
        self.each_timer(|k, t| {
            debug_assert!(
                k != timer || t > now,
                "{timer:?} still due after its expiry"
            )
        });
    }

    // ----------------------------------------------------------------- internals

    /// The upstream I/O slot is an L2 lookup's (Redis), not the origin's.
    #[inline]
    fn is_l2(&self) -> bool {
        matches!(self.source, Source::L2(_))
    }

    fn current_upstream(&self) -> &Upstream {
        let id = self.req.as_ref().map_or(0, |r| r.upstream as usize);
        &self.ctx.upstreams[id]
    }

    fn process_client(&mut self, now: Instant) {
        loop {
            match self.state {
                State::Idle => {
                    if self.conn.input.is_empty() {
                        if self.conn.eof {
                            // Everything the client sent before its half-close is answered.
                            self.close_when_flushed();
                        }
                        return;
                    }
                    match &self.source {
                        Source::CacheLock(w) if now < w.next => return,
                        Source::L2(_) => return,
                        _ => {}
                    }
                    // The previous answer is still going out: a pipelined request waits
                    // until it drains (`on_client_written`), so a burst of pipelined
                    // requests answered from the cache never piles up their bodies.
                    if self.conn.out_len() >= HIGH_WATER {
                        return;
                    }
                    let parsed = head::parse_request(&self.conn.input, &self.ctx.limits);
                    match parsed {
                        Err(e) => {
                            self.client_error(e, now);
                            return;
                        }
                        Ok(Parsed::Partial) if self.conn.eof => {
                            // The client is done sending: the rest never comes.
                            self.close_when_flushed();
                            return;
                        }
                        Ok(Parsed::Partial) => {
                            if self.conn.head_started.is_none() {
                                self.conn.head_started = Some(now);
                            }
                            return;
                        }
                        Ok(Parsed::Complete(h)) => {
                            if !self.body_buffered(&h, now) {
                                return;
                            }
                            self.start_request(h, now)
                        }
                    }
                }
                State::Active => {
                    if !matches!(self.req_body, ReqBody::Done) {
                        if let Err(e) = self.forward_request_body() {
                            let started = self.req.as_ref().is_some_and(|r| r.response_started);
                            if started {
                                tracing::debug!(client = %self.peer.ip, error = %e, "bad request body after response started");
                                self.abort(now);
                            } else {
                                self.release_upstream(false);
                                self.client_error(e, now);
                            }
                        }
                    }
                    return;
                }
                State::Closing | State::Closed => return,
            }
        }
    }

    /// Is the request ready to go upstream, as far as its body is concerned? A body of at
    /// most `client_body_buffer_size` is received whole first, so a slow client holds no
    /// backend connection; a longer one (or one whose end is not within that size) is
    /// streamed. While it waits, an `Expect: 100-continue` is answered here (the
    /// backend is not asked).
    fn body_buffered(&mut self, h: &RequestHead, now: Instant) -> bool {
        let limit = self.ctx.body_buffer;
        let have = &self.conn.input[h.len..];
        let complete = match h.body {
            _ if limit == 0 => true,
            BodyKind::None | BodyKind::UntilClose => true,
            BodyKind::Length(n) => n > limit as u64 || have.len() as u64 >= n,
            BodyKind::Chunked => {
                let mut d = ChunkedDecoder::new();
                let mut pos = 0;
                loop {
                    match d.decode(&have[pos..]) {
                        // A broken body is reported by the streaming path.
                        Err(_) | Ok((_, Some(Chunk::End))) => break true,
                        Ok((used, _)) => {
                            pos += used;
                            if pos > limit {
                                break true;
                            }
                            if used == 0 || pos == have.len() {
                                break false;
                            }
                        }
                    }
                }
            }
        };
        if complete {
            return true;
        }
        if self.conn.eof {
            self.body_wait = None;
            self.client_error(
                HttpError::new(
                    Status::BadRequest,
                    "client closed before sending the whole request body",
                ),
                now,
            );
            return false;
        }
        if self.body_wait.is_none() {
            self.body_wait = Some(now);
            self.conn.head_started = None;
            if h.expect_continue && h.version == Version::Http11 {
                self.conn
                    .output
                    .vec()
                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
        }
        false
    }

    /// The connection closes after the response to `h` (its head still in `client_in`):
    /// the client asked, a drain, the client's half-close with nothing sent after `h`, or
    /// the per-connection request limit.
    fn closes_after(&self, h: &RequestHead) -> bool {
        self.conn
            .closes_after(h.len, h.keep_alive, self.ctx.max_requests_per_connection)
    }

    /// The client half-closed and nothing it sent is left to answer.
    fn client_finished(&self) -> bool {
        self.conn.eof && self.conn.input_is_empty()
    }

    /// Close now, or once the output still queued has gone out.
    fn close_when_flushed(&mut self) {
        self.state = if !self.conn.has_output(true) {
            State::Closed
        } else {
            State::Closing
        };
    }

    /// Answer a request from the cache: no backend involved.
    fn serve_hit(
        &mut self,
        h: &RequestHead,
        stored: &Stored,
        age: u64,
        stale: bool,
        not_modified: bool,
        now: Instant,
    ) {
        let ctx = self.ctx.clone();
        let close = self.closes_after(h);
        self.conn.input.advance(h.len);
        let status = if not_modified {
            304
        } else {
            stored.facts.status
        };
        ctx.metrics.count_status(status);
        if let Some(cache) = &ctx.cache {
            stored.demand.hit(ctx.clock.at(now));
            let st = &cache.stats;
            st.hits.fetch_add(1, Ordering::Relaxed);
            if stale {
                st.stale_served.fetch_add(1, Ordering::Relaxed);
            }
            if not_modified {
                st.not_modified.fetch_add(1, Ordering::Relaxed);
            }
            st.bytes_served
                .fetch_add(stored.body.len() as u64, Ordering::Relaxed);
        }
        let how = if stale {
            Served::Stale
        } else if self.l2_filled() {
            Served::L2Hit
        } else {
            Served::Hit
        };
        write_hit(
            &mut self.conn.output,
            stored,
            HitReply {
                age,
                how,
                head_only: h.method == Method::Head,
                not_modified,
                close,
                http10_keep_alive: h.version == Version::Http10 && !close,
            },
        );
        self.served(close, now);
    }

    /// A response answered without a backend is queued whole: the next request, or close.
    fn served(&mut self, close: bool, now: Instant) {
        self.conn.requests_done += 1;
        self.conn.last_io = now;
        self.state = if close { State::Closing } else { State::Idle };
    }

    fn forward_request_body(&mut self) -> Result<(), HttpError> {
        match &mut self.req_body {
            ReqBody::Done => {}
            ReqBody::Length(rem) => {
                let n = (*rem).min(self.conn.input.len() as u64) as usize;
                self.up_out.vec().extend_from_slice(&self.conn.input[..n]);
                self.conn.input.advance(n);
                *rem -= n as u64;
                if *rem == 0 {
                    self.req_body = ReqBody::Done;
                }
            }
            ReqBody::Chunked(dec) => {
                let mut pos = 0;
                let mut done = false;
                loop {
                    let (used, chunk) = dec.decode(&self.conn.input[pos..]).map_err(|_| {
                        HttpError::new(Status::BadRequest, "invalid chunked request body")
                    })?;
                    match chunk {
                        Some(Chunk::Data(r)) => {
                            if dec.decoded > self.ctx.limits.max_body {
                                return Err(HttpError::new(
                                    Status::PayloadTooLarge,
                                    "chunked request body larger than max_body_size",
                                ));
                            }
                            push_chunk(
                                self.up_out.vec(),
                                &self.conn.input[pos + r.start..pos + r.end],
                            );
                        }
                        Some(Chunk::End) => {
                            self.up_out.vec().extend_from_slice(LAST_CHUNK);
                            done = true;
                        }
                        None => {}
                    }
                    pos += used;
                    if done || used == 0 || pos == self.conn.input.len() {
                        break;
                    }
                }
                self.conn.input.advance(pos);
                if done {
                    self.req_body = ReqBody::Done;
                }
            }
        }
        Ok(())
    }

    fn start_request(&mut self, mut h: RequestHead, now: Instant) {
        let ctx = self.ctx.clone();
        if let Some(admin) = &ctx.admin {
            self.answer_admin(admin, &h, now);
            return;
        }
        // A wait that ended, or the fetch an L2 miss hands back.
        let (waited, after_l2) = match std::mem::take(&mut self.source) {
            Source::CacheLock(w) => (Some(w), None),
            Source::AfterL2(p) => (None, Some(p)),
            other => {
                debug_assert!(
                    matches!(other, Source::Direct),
                    "start_request while {other:?}"
                );
                self.source = other;
                (None, None)
            }
        };
        if waited.is_none() && !self.l2_resumed() {
            ctx.metrics.requests.fetch_add(1, Ordering::Relaxed);
        }
        self.conn.head_started = None;
        // The body waited here (small, buffered whole); its 100 Continue went out already.
        let waited_body = self.body_wait.take();
        let body_since = waited_body.unwrap_or(now);
        let continue_sent = waited_body.is_some() && h.expect_continue;
        // One form of the target and host for routing, the cache key and the backend.
        // (Idempotent: a head looked at again after a cache wait is unchanged.)
        if let Err(e) = h.normalize(&mut self.conn.input[..h.len], ctx.merge_slashes) {
            self.conn.input.advance(h.len);
            self.client_error(e, now);
            return;
        }
        if h.method == Method::Trace && !ctx.allow_trace {
            // Reflecting a request back (with whatever a hop added) is for debugging.
            let close = h.body != BodyKind::None || !h.keep_alive;
            self.conn.input.advance(h.len);
            self.reply_error(Status::MethodNotAllowed, close, now);
            return;
        }
        let buf: &[u8] = &self.conn.input;
        let host = h.effective_host(buf);
        let path = h.path.get(buf);
        let Some(up_id) = ctx
            .router
            .route(host, if path.is_empty() { b"/" } else { path })
        else {
            let body = h.body != BodyKind::None;
            self.conn.input.advance(h.len);
            tracing::debug!(client = %self.peer.ip, "404: no route for this host and path");
            self.reply_error(Status::NotFound, body || !h.keep_alive, now);
            return;
        };
        let mut cache_req = CacheReq::None;
        if let Some(p) = after_l2 {
            // Back from an L2 miss: this request still leads the key's fetch.
            cache_req = CacheReq::Miss(p);
        } else if let Some(cache) = &ctx.cache {
            let since = waited.map_or(now, |w| w.since);
            let may_wait = now < since + cache.lock_timeout;
            let waker = self.waker.as_ref();
            match cache.lookup(&h, buf, self.peer, ctx.clock.at(now), may_wait, waker) {
                Lookup::Wait => {
                    // The head stays in `client_in`: a wake-up looks again, else the timer
                    // (polling); with a waker the timer only ends the wait.
                    let next = match waker {
                        Some(_) => since + cache.lock_timeout,
                        None => now + crate::cache::http::WAIT_POLL,
                    };
                    self.source = Source::CacheLock(CacheWait { since, next });
                    return;
                }
                Lookup::Bypass => {}
                Lookup::Invalidate { key, scheme_host } => {
                    cache_req = CacheReq::Invalidate {
                        key,
                        host: scheme_host,
                    }
                }
                Lookup::Miss(p) => match self.l2_begin(p, now) {
                    Some(p) => cache_req = CacheReq::Miss(p),
                    // The head stays in `client_in` until L2 answers.
                    None => return,
                },
                Lookup::Hit {
                    stored,
                    age,
                    stale,
                    not_modified,
                    refresh,
                } => {
                    if let Some(p) = refresh {
                        // Served stale: refresh in the background (the runtime's fetcher).
                        let (hb, hh) = p.request_head();
                        let mut request = Vec::with_capacity(hb.len() + 160);
                        write_upstream_head(
                            &mut request,
                            hb,
                            hh,
                            self.peer,
                            &ctx.upstreams[up_id].backends[0].host,
                            &ctx.via_name,
                            false,
                        );
                        let mut extra = p.refresh_lines();
                        extra.extend_from_slice(b"Connection: close\r\n");
                        let end = request.len() - 2;
                        request.splice(end..end, extra);
                        cache.queue_refresh(Refresh {
                            upstream: up_id as u16,
                            request,
                            pending: p,
                        });
                    }
                    self.serve_hit(&h, &stored, age, stale, not_modified, now);
                    return;
                }
                Lookup::Follow(g) => {
                    self.begin_follow(&h, g, now);
                    return;
                }
                Lookup::Unsatisfiable => {
                    self.conn.input.advance(h.len);
                    self.reply_error(Status::GatewayTimeout, !h.keep_alive, now);
                    return;
                }
            }
        }
        let buf: &[u8] = &self.conn.input;
        let upstream = &ctx.upstreams[up_id];

        // Hash key for consistent_hash (copied: the head bytes are consumed below).
        let mut hash_key: SmallVec<[u8; 64]> = SmallVec::new();
        let mut has_hash_key = false;
        if upstream.cfg.algorithm == Algorithm::ConsistentHash {
            let v = match &upstream.cfg.hash_key {
                HashKey::Header(name) => h.header(buf, name),
                HashKey::Cookie(name) => h
                    .header(buf, "cookie")
                    .and_then(|c| cookie_value(c, name.as_bytes())),
                HashKey::Path => Some(h.path.get(buf)),
                HashKey::ClientIp => None,
            };
            if let Some(v) = v {
                hash_key.extend_from_slice(v);
                has_hash_key = true;
            }
        }

        let mut req = Req {
            cache: cache_req,
            method: h.method,
            version: h.version,
            has_body: h.body != BodyKind::None,
            upstream: up_id as u16,
            attempts: AttemptState::new(upstream),
            response_started: false,
            resp_at: 0,
            body_since,
            resp_bytes: 0,
            close_after: self.closes_after(&h),
            hash_key,
            has_hash_key,
        };

        let Some(backend) = begin_attempt(&mut req, self.peer.ip, upstream, now) else {
            self.conn.input.advance(h.len);
            tracing::warn!(client = %self.peer.ip, upstream = %upstream.cfg.name, "503: no backend available (every one down or at max_conns)");
            let close = req.has_body || req.close_after;
            self.req = Some(req);
            if self.serve_stale_on_error(close, now) {
                return;
            }
            self.reply_error(Status::ServiceUnavailable, close, now);
            return;
        };

        // The upstream request head.
        self.up_head.clear();
        write_upstream_head(
            &mut self.up_head,
            buf,
            &h,
            self.peer,
            &upstream.backends[backend].host,
            &ctx.via_name,
            continue_sent,
        );
        // Validating a stale stored response: the conditional goes before the blank line.
        if let CacheReq::Miss(p) = &mut req.cache {
            if let Some(lines) = p.validator_lines() {
                let end = self.up_head.len() - 2;
                self.up_head.splice(end..end, lines);
            }
        }
        self.conn.input.advance(h.len);

        self.req_body = match h.body {
            BodyKind::None | BodyKind::UntilClose => ReqBody::Done,
            BodyKind::Length(n) => ReqBody::Length(n),
            BodyKind::Chunked => ReqBody::Chunked(ChunkedDecoder::new()),
        };
        self.up_out.clear();
        self.up_out.vec().extend_from_slice(&self.up_head);
        self.up_in.clear();
        self.push_connect(
            up_id as u16,
            backend as u16,
            upstream.backends[backend].addr,
            false,
        );
        self.req = Some(req);
        self.up = Up::Connecting {
            since: now,
            fresh: false,
        };
        self.resp = ResponseReader::new();
        self.state = State::Active;
    }

    /// Connect failed or timed out: passive health, then retry elsewhere or answer 502/504.
    fn connect_failed(&mut self, now: Instant, timed_out: bool) {
        self.report_backend_failure(now);
        let (status, why) = if timed_out {
            (
                Status::GatewayTimeout,
                "connecting to the backend timed out",
            )
        } else {
            (Status::BadGateway, "could not connect to the backend")
        };
        let retry = self
            .req
            .as_ref()
            .is_some_and(|r| r.method.is_idempotent() && !r.has_body && r.attempts.may_retry());
        if retry {
            self.release_upstream(false);
            if let Some(r) = self.req.as_mut() {
                r.attempts.take_retry(&self.ctx.metrics);
            }
            if self.connect_again(now, false, true) {
                return;
            }
            tracing::warn!(client = %self.peer.ip, "{}: {why}; no other backend to retry on", status.code());
            self.reply_upstream_error(status, now);
            return;
        }
        self.upstream_error(status, why, now);
    }

    /// Connect for the current request again: the same backend on a fresh connection, or
    /// (`repick`) another backend. Returns false when no backend is left.
    fn connect_again(&mut self, now: Instant, fresh: bool, repick: bool) -> bool {
        let ctx = self.ctx.clone();
        let Some(req) = self.req.as_mut() else {
            return false;
        };
        let upstream = &ctx.upstreams[req.upstream as usize];
        let backend = if repick {
            begin_attempt(req, self.peer.ip, upstream, now)
        } else {
            req.attempts.again_on_fresh(upstream)
        };
        let Some(backend) = backend else {
            return false;
        };
        req.resp_bytes = 0;
        let up_id = req.upstream;
        // The head names the backend's Host only for HTTP/1.0 clients without Host; the
        // stored head is reused as is.
        self.up_out.clear();
        self.up_out.vec().extend_from_slice(&self.up_head);
        self.up_in.clear();
        self.push_connect(
            up_id,
            backend as u16,
            upstream.backends[backend].addr,
            fresh || repick,
        );
        self.up = Up::Connecting { since: now, fresh };
        self.resp = ResponseReader::new();
        true
    }

    fn report_backend_failure(&self, now: Instant) {
        if let Some(r) = &self.req {
            r.attempts
                .report_failure(&self.ctx.upstreams[r.upstream as usize], now);
        }
    }

    /// Ask the runtime for an upstream connection: a new I/O, named in the action.
    fn push_connect(&mut self, upstream: u16, backend: u16, addr: SocketAddr, fresh: bool) {
        self.io_seq = self.io_seq.wrapping_add(1);
        self.up_io = IoId(self.io_seq);
        debug_assert!(
            self.connect.is_none(),
            "a connect before the last one's release"
        );
        self.connect = Some(Action::Connect {
            io: self.up_io,
            upstream,
            backend,
            addr,
            fresh,
        });
    }

    /// Whether a completion is about the current upstream I/O (else it is misuse: I/O the
    /// session let go, or never asked for).
    #[inline]
    fn is_current(&self, io: IoId, what: &'static str) -> bool {
        if io == self.up_io && self.io_seq != 0 {
            return true;
        }
        misuse(what);
        false
    }

    /// Ask the runtime to release the upstream connection. A connect it has not picked up
    /// yet is withdrawn instead, so a request rejected straight after its head (a bad body
    /// already buffered) opens no connection at all.
    fn push_release(&mut self, upstream: u16, backend: u16, reuse: bool) {
        if self.connect.take().is_some() {
            return;
        }
        debug_assert!(self.release.is_none(), "a second release without a connect");
        self.release = Some(Action::ReleaseUpstream {
            io: self.up_io,
            upstream,
            backend,
            reuse,
        });
    }

    /// Give up the upstream connection (and the backend's in-flight slot).
    fn release_upstream(&mut self, reuse: bool) {
        if self.up == Up::None {
            return;
        }
        self.up = Up::None;
        if let Some(r) = self.req.as_mut() {
            let upstream = r.upstream;
            if let Some(b) = r.attempts.end(&self.ctx.upstreams[upstream as usize]) {
                self.push_release(upstream, b as u16, reuse);
            }
        }
        self.up_out.clear();
        if !reuse {
            self.up_in.clear();
        }
    }

    /// Read the backend's response into the client's output: the head through the
    /// response pipeline ([`crate::respond`]), the body de-framed by the reader and passed
    /// through the body stages (the cache's capture) to the client's framing.
    fn process_upstream(&mut self, now: Instant) {
        if self.resp.awaiting_head() && !self.process_response_head(now) {
            return;
        }
        if !self.resp.in_body() {
            return;
        }
        let sink = ClientBody::new(&mut self.conn.output, self.resp_framing);
        let read = match (self.capture.as_mut(), &self.ctx.cache) {
            (Some(capture), Some(cache)) => self.resp.read_body(
                &mut self.up_in,
                &mut CaptureStage {
                    cache,
                    capture,
                    next: sink,
                },
            ),
            _ => self.resp.read_body(&mut self.up_in, &mut { sink }),
        };
        match read {
            Ok(true) => {
                self.capture = None;
                let reuse = self.resp.reusable(&self.up_in);
                self.finish_exchange(reuse, now);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(client = %self.peer.ip, error = %e, "invalid chunk");
                self.up_in.clear();
                self.broken_response("invalid chunked response from backend", now);
            }
        }
    }

    /// Read response heads until the final one: interim ones are relayed, the final one is
    /// judged (passive health, revalidation, stale-if-error) and its head queued for the
    /// client. True when its body is to be read next.
    fn process_response_head(&mut self, now: Instant) -> bool {
        loop {
            let h = match self.resp.head(&self.up_in) {
                Err(e) => {
                    self.report_backend_failure(now);
                    self.upstream_error(e.status, e.why, now);
                    return false;
                }
                Ok(Parsed::Partial) => return false,
                Ok(Parsed::Complete(h)) => h,
            };
            let Some(req) = self.req.as_mut() else {
                return false;
            };
            if h.status == 101 {
                self.report_backend_failure(now);
                self.upstream_error(
                    Status::BadGateway,
                    "backend switched protocols without an upgrade request",
                    now,
                );
                return false;
            }
            if (100..200).contains(&h.status) {
                // Interim response: relay to HTTP/1.1 clients (100 Continue, 103).
                if req.version == Version::Http11 {
                    let out = self.conn.output.vec();
                    write_status_line(out, h.status, h.reason.get(&self.up_in));
                    for hd in &h.headers {
                        if !h.is_hop(&self.up_in, hd) {
                            push_header(out, hd.name.get(&self.up_in), hd.value.get(&self.up_in));
                        }
                    }
                    out.extend_from_slice(b"\r\n");
                }
                self.resp.skip_interim(&mut self.up_in, &h);
                continue;
            }
            return self.final_response_head(&h, now);
        }
    }

    fn final_response_head(&mut self, h: &ResponseHead, now: Instant) -> bool {
        let Some(req) = self.req.as_mut() else {
            return false;
        };
        let upstream = &self.ctx.upstreams[req.upstream as usize];
        req.attempts.report_status(upstream, h.status, now);
        // The cache validated a stale response: a 304 refreshes and serves it; an origin
        // error may be answered with it (stale-if-error).
        if let (Some(cache), CacheReq::Miss(p)) = (&self.ctx.cache, &req.cache) {
            let wall = self.ctx.clock.at(now);
            if h.status == 304 && p.validating {
                if let Some(stored) = cache.revalidated(p, h, &self.up_in, wall) {
                    self.resp.start_body(&mut self.up_in, h, true);
                    let reuse = self.resp.reusable(&self.up_in);
                    self.finish_revalidated(&stored, wall, reuse, now);
                    return false;
                }
            } else if matches!(h.status, 500 | 502 | 503 | 504) {
                let close = req.close_after;
                if self.serve_stale_on_error(close, now) {
                    return false;
                }
            }
        }
        let Some(req) = self.req.as_mut() else {
            return false;
        };
        self.ctx.metrics.count_status(h.status);
        let no_body = req.method == Method::Head || h.status == 204 || h.status == 304;
        // Request body still unsent when the answer comes: close afterwards.
        if !matches!(self.req_body, ReqBody::Done) {
            req.close_after = true;
        }
        let framing = match (no_body, h.body) {
            (true, _) => Framing::NoBody,
            (false, BodyKind::None) => Framing::Length(0),
            (false, BodyKind::Length(n)) => Framing::Length(n),
            (false, BodyKind::Chunked | BodyKind::UntilClose) => {
                if req.version == Version::Http11 {
                    Framing::Chunked
                } else {
                    Framing::Close
                }
            }
        };
        if framing == Framing::Close {
            req.close_after = true;
        }
        let ub: &[u8] = &self.up_in;
        let mut plan = ResponsePlan::forwarded(h, ub, framing);
        if let Some(cache) = self.ctx.cache.as_ref().filter(|c| c.strips_any()) {
            plan.drop_where(|name| cache.strips(name));
        }
        self.capture = None;
        if let Some(cache) = &self.ctx.cache {
            match &req.cache {
                CacheReq::Miss(p) => {
                    // Bodies delimited by the backend's close are not stored.
                    if req.method == Method::Get && h.body != BodyKind::UntilClose {
                        self.capture = cache.begin_capture(p, h, ub, self.ctx.clock.at(now));
                    } else {
                        p.pass(self.ctx.clock.at(now));
                    }
                    cache.stats.misses.fetch_add(1, Ordering::Relaxed);
                    plan.add_lines(if self.capture.is_some() {
                        b"X-Cache: MISS\r\nCache-Status: trireme; fwd=miss; stored\r\n"
                    } else {
                        b"X-Cache: MISS\r\nCache-Status: trireme; fwd=miss\r\n"
                    });
                }
                CacheReq::Invalidate { key, host } => {
                    if crate::cache::invalidating_status(h.status) {
                        cache.invalidate(key, host, h, ub);
                    }
                }
                CacheReq::None => {}
            }
        }
        plan.close = req.close_after;
        plan.http10_keep_alive = !req.close_after && req.version == Version::Http10;
        // Client response head.
        req.resp_at = self.conn.output.end_offset();
        let clock = &self.ctx.clock;
        plan.write_h1(self.conn.output.vec(), || clock.at(now));
        drop(plan);
        req.response_started = true;
        self.resp_framing = framing;
        if self.resp.start_body(&mut self.up_in, h, no_body) == BodyKind::None {
            self.finish_capture();
            let reuse = self.resp.reusable(&self.up_in);
            self.finish_exchange(reuse, now);
            return false;
        }
        true
    }

    /// A 304 from the origin refreshed the stored response: answer the client from it.
    fn finish_revalidated(
        &mut self,
        stored: &Stored,
        wall: std::time::SystemTime,
        up_reusable: bool,
        now: Instant,
    ) {
        let finished = self.client_finished();
        let Some(req) = self.req.as_mut() else { return };
        req.response_started = true;
        let close = req.close_after || self.conn.draining || finished;
        let head_only = req.method == Method::Head;
        let http10 = req.version == Version::Http10;
        self.ctx.metrics.count_status(stored.facts.status);
        write_hit(
            &mut self.conn.output,
            stored,
            HitReply {
                age: crate::cache::current_age(&stored.facts, wall).as_secs(),
                how: Served::Revalidated,
                head_only,
                not_modified: false,
                close,
                http10_keep_alive: http10 && !close,
            },
        );
        self.resp = ResponseReader::done();
        self.finish_exchange(up_reusable, now);
    }

    /// The response arrived whole: the copy being made goes into the cache.
    fn finish_capture(&mut self) {
        if let (Some(mut c), Some(cache)) = (self.capture.take(), &self.ctx.cache) {
            cache.finish(&mut c);
        }
    }

    /// The response is complete (request body may or may not be).
    fn finish_exchange(&mut self, up_reusable: bool, now: Instant) {
        self.capture = None;
        let req_done = matches!(self.req_body, ReqBody::Done);
        // Extra bytes after a complete response: the backend broke framing; never reuse.
        let reuse = up_reusable && req_done && self.up_in.is_empty();
        self.release_upstream(reuse);
        self.up_in.clear();
        self.conn.requests_done += 1;
        let close = self.req.as_ref().is_none_or(|r| r.close_after)
            || !req_done
            || self.conn.draining
            || self.client_finished();
        self.req = None;
        self.req_body = ReqBody::Done;
        self.resp = ResponseReader::done();
        if close {
            self.state = State::Closing;
        } else {
            self.state = State::Idle;
            self.conn.last_io = now;
            // A pipelined request may already be waiting.
            self.process_client(now);
        }
    }

    /// A client protocol error: answer with its status and close (the read side stays
    /// failed). If a response is already under way, abort instead.
    fn client_error(&mut self, e: HttpError, now: Instant) {
        self.ctx
            .metrics
            .client_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(client = %self.peer.ip, status = e.status.code(), why = e.why, "rejecting request");
        self.reply_error(e.status, true, now);
    }

    /// Queue a proxy-generated response. With `close`, the connection closes after it.
    fn reply_error(&mut self, status: Status, close: bool, now: Instant) {
        let started = self.req.as_ref().is_some_and(|r| r.response_started);
        if started {
            self.state = State::Closed;
            return;
        }
        self.ctx.metrics.count_status(status.code());
        let close = close || self.conn.draining || self.client_finished();
        error_response(
            self.conn.output.vec(),
            status,
            close,
            self.ctx.clock.at(now),
        );
        self.conn.requests_done += 1;
        self.req = None;
        self.resp = ResponseReader::done();
        self.conn.head_started = None;
        if close {
            self.conn.input.clear();
            self.req_body = ReqBody::Done;
            self.state = State::Closing;
        } else {
            self.req_body = ReqBody::Done;
            self.state = State::Idle;
        }
    }

    /// An admin listener's request, answered here (see [`crate::admin`]).
    fn answer_admin(&mut self, admin: &crate::admin::Admin, h: &RequestHead, now: Instant) {
        self.conn.head_started = None;
        if !matches!(h.body, BodyKind::None | BodyKind::Length(0)) {
            // No admin request has a body; not reading it means closing after the answer.
            self.conn.input.advance(h.len);
            self.reply_error(Status::PayloadTooLarge, true, now);
            return;
        }
        let a = admin.answer(h, &self.conn.input[..h.len], now);
        let close = self.closes_after(h);
        self.conn.input.advance(h.len);
        self.ctx.metrics.count_status(a.status);
        let close = close || self.client_finished();
        let body = (h.method != Method::Head).then_some(&a.body[..]);
        crate::http1::write::local_response(
            self.conn.output.vec(),
            (a.status, a.reason.as_bytes()),
            a.content_type,
            a.extra,
            (a.body.len(), body),
            close,
            self.ctx.clock.at(now),
        );
        self.conn.requests_done += 1;
        if close {
            self.conn.input.clear();
            self.state = State::Closing;
        } else {
            self.state = State::Idle;
        }
    }

    /// 502/503/504 for the request in flight, with a log line saying why.
    fn upstream_error(&mut self, status: Status, why: &'static str, now: Instant) {
        let started = self.req.as_ref().is_some_and(|r| r.response_started);
        if let Some(r) = &self.req {
            let up = &self.ctx.upstreams[r.upstream as usize];
            let backend = r
                .attempts
                .current()
                .map(|b| up.backends[b].addr.to_string())
                .unwrap_or_default();
            tracing::warn!(client = %self.peer.ip, upstream = %up.cfg.name, backend = %backend, status = status.code(), "{why}");
        }
        self.release_upstream(false);
        if started {
            self.abort(now);
            return;
        }
        self.reply_upstream_error(status, now);
    }

    fn reply_upstream_error(&mut self, status: Status, now: Instant) {
        self.ctx
            .metrics
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
        self.release_upstream(false);
        // Keep the client connection only if its request was read completely.
        let close = !matches!(self.req_body, ReqBody::Done)
            || self.req.as_ref().is_none_or(|r| r.close_after);
        if self.serve_stale_on_error(close, now) {
            return;
        }
        self.reply_error(status, close, now);
    }

    /// The origin failed or none is available: answer with a stored response if it may
    /// be served stale on error (`stale-if-error`). True when it did.
    fn serve_stale_on_error(&mut self, close: bool, now: Instant) -> bool {
        let Some(cache) = self.ctx.cache.clone() else {
            return false;
        };
        let Some(req) = self.req.as_ref() else {
            return false;
        };
        let CacheReq::Miss(p) = &req.cache else {
            return false;
        };
        if req.response_started {
            return false;
        }
        let Some((stored, age)) = cache.stale_for_error(p, self.ctx.clock.at(now)) else {
            return false;
        };
        let (head_only, http10) = (req.method == Method::Head, req.version == Version::Http10);
        self.release_upstream(false);
        let close = close || self.conn.draining || self.client_finished();
        self.ctx.metrics.count_status(stored.facts.status);
        write_hit(
            &mut self.conn.output,
            &stored,
            HitReply {
                age,
                how: Served::StaleIfError,
                head_only,
                not_modified: false,
                close,
                http10_keep_alive: http10 && !close,
            },
        );
        tracing::info!(client = %self.peer.ip, "origin failed; served a stale response (stale-if-error)");
        self.conn.requests_done += 1;
        self.req = None;
        self.resp = ResponseReader::done();
        self.req_body = ReqBody::Done;
        self.state = if close { State::Closing } else { State::Idle };
        true
    }

    /// The backend broke the response it was sending (a malformed chunk, a close before
    /// the end). While none of it has reached the client (its head may still be queued,
    /// even in the same read), the client gets a clean 502 instead; once some has, the
    /// connection is cut, the only signal left.
    fn broken_response(&mut self, why: &'static str, now: Instant) {
        self.report_backend_failure(now);
        let at = self.req.as_ref().map(|r| r.resp_at);
        match at {
            Some(at) if self.conn.output.untouched_from(at) => {
                self.conn.output.truncate_at(at);
                // An unfinished copy into the cache is abandoned (cutting off followers).
                self.capture = None;
                self.resp = ResponseReader::done();
                if let Some(r) = self.req.as_mut() {
                    r.response_started = false;
                    // The backend's framing is lost: nothing more on this connection.
                    r.close_after = true;
                }
                self.upstream_error(Status::BadGateway, why, now);
            }
            _ => {
                tracing::warn!(client = %self.peer.ip, "{why}; closing the client connection");
                self.abort(now);
            }
        }
    }

    /// Tear down: no more output, close the client and the upstream connection.
    fn abort(&mut self, _now: Instant) {
        self.release_upstream(false);
        self.l2_release(false);
        self.source = Source::Direct;
        // An unfinished copy into the cache is abandoned (cutting off its followers).
        self.capture = None;
        // Closed means nothing more is written: pending output is dropped, so a runtime
        // whose write failed has nothing left to retry.
        self.conn.clear_output();
        self.up_out.clear();
        self.req = None;
        self.req_body = ReqBody::Done;
        self.resp = ResponseReader::done();
        self.state = State::Closed;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Keep least_conn and active counts exact when a runtime drops a busy session.
        if let Some(r) = self.req.as_mut() {
            r.attempts.end(&self.ctx.upstreams[r.upstream as usize]);
        }
        self.ctx
            .metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(a) = &self.ctx.admin {
            a.closed();
        }
    }
}

fn cookie_value<'a>(cookies: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    cookies.split(|&b| b == b';').find_map(|c| {
        let c = head::trim(c);
        let eq = c.iter().position(|&b| b == b'=')?;
        (c[..eq] == *name).then(|| &c[eq + 1..])
    })
}

pub(crate) fn write_status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_dec(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// Serialize the request head sent to the backend: origin-form target, hop-by-hop fields
/// removed, the forwarding fields set by [`crate::forward`]'s rules, framing regenerated.
/// `drop_expect`: the proxy answered `Expect: 100-continue` itself (the body is here).
fn write_upstream_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    h: &RequestHead,
    peer: Peer,
    backend_host: &str,
    via: &str,
    drop_expect: bool,
) {
    out.extend_from_slice(h.method_span.get(buf));
    out.push(b' ');
    let path = h.path.get(buf);
    if path.is_empty() {
        out.push(b'/');
    } else {
        out.extend_from_slice(path);
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    let host = match h.effective_host(buf) {
        b"" => backend_host.as_bytes(),
        h => h,
    };
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    let mut fwd = ForwardFields::default();
    let mut runs = Runs::new(buf);
    for hd in &h.headers {
        let (name, value) = (hd.name.get(buf), hd.value.get(buf));
        if h.is_hop(buf, hd)
            || fwd.note(peer, name, value)
            || (drop_expect && head::name_is(name, b"expect"))
        {
            runs.flush(out);
            continue;
        }
        runs.keep(out, hd);
    }
    runs.flush(out);
    let via_self: &[u8] = if h.version == Version::Http10 {
        b"1.0 "
    } else {
        b"1.1 "
    };
    // "1.1 trireme": the version the client spoke, then this proxy's name.
    let mut via_buf: SmallVec<[u8; 32]> = SmallVec::new();
    via_buf.extend_from_slice(via_self);
    via_buf.extend_from_slice(via.as_bytes());
    fwd.write(out, peer, host, &via_buf);
    match h.body {
        BodyKind::Length(n) => push_content_length(out, n),
        BodyKind::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyKind::None | BodyKind::UntilClose => {
            // Keep an explicit zero length for methods that usually carry a body.
            if matches!(h.method, Method::Post | Method::Put | Method::Patch) {
                out.extend_from_slice(b"Content-Length: 0\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

mod follow;
mod l2;
#[cfg(test)]
mod tests;
