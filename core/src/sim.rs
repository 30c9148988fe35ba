//! Deterministic simulator: clients, proxy sessions and backends exchange bytes through an
//! in-memory network with a virtual clock that jumps to the next deadline or event.
//!
//! Faults are scripted per backend ([`Behavior`]) and byte delivery is split into seeded
//! random pieces, so every scenario replays exactly from its seed. The same scenarios run
//! over real sockets in `tests/`.

use crate::http1::body::{Chunk, ChunkedDecoder};
use crate::http1::head::{parse_request, Parsed};
use crate::http1::{BodyKind, Limits};
use crate::proxy::{Action, IoId, ProxyContext, Session};
use crate::upstream::{ConnMeta, Liveness, Pool};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend's scripted reply to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
    /// Send no framing header and close after the body.
    pub until_close: bool,
    /// Add `Connection: close` and close after the response.
    pub close: bool,
    pub delay: Duration,
    /// Die (close the connection) after this many bytes of the response.
    pub die_after: Option<usize>,
    /// Time between the pieces of the response (zero: all at once).
    pub drip: Duration,
    /// Bytes the backend sends this long after the response, unasked (broken framing or
    /// an unsolicited response).
    pub then: Option<(Duration, Vec<u8>)>,
}

impl Reply {
    pub fn ok(body: &[u8]) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.to_vec(),
            chunked: false,
            until_close: false,
            close: false,
            delay: Duration::ZERO,
            die_after: None,
            drip: Duration::ZERO,
            then: None,
        }
    }
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            ..Reply::ok(b"")
        }
    }

    fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} Sim\r\n", self.status).into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        if self.chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            if !head_only {
                for c in self.body.chunks(1000) {
                    crate::http1::write::push_chunk(&mut out, c);
                }
                out.extend_from_slice(crate::http1::write::LAST_CHUNK);
            }
        } else if self.until_close {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&self.body);
        } else {
            out.extend_from_slice(
                format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes(),
            );
            if !head_only {
                out.extend_from_slice(&self.body);
            }
        }
        out
    }
}

/// A request as a simulated backend received it.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub head: String,
    pub body: Vec<u8>,
    pub conn: usize,
}

impl SimRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
}

/// What a backend does.
pub enum Behavior {
    /// Answer every request with the handler's reply.
    Serve(Box<dyn FnMut(&SimRequest) -> Reply>),
    /// Refuse connections.
    Refuse,
    /// Accept the SYN never: connects hang until the proxy's connect timeout.
    Blackhole,
}

pub struct SimBackend {
    pub addr: SocketAddr,
    pub behavior: Behavior,
    pub requests: Vec<SimRequest>,
    pub connections: usize,
}

struct UpConn {
    backend: usize,
    /// Bytes the backend has received but not yet parsed.
    inbuf: Vec<u8>,
    alive: bool,
    /// Owning client, while in use.
    client: Option<usize>,
    id: usize,
    head_request: bool,
    /// Bytes that reached the proxy's socket while nobody read it (idle in the pool): the
    /// kernel's receive queue. A session that takes the connection reads them first.
    unread: Vec<u8>,
    /// The backend closed it while it sat idle (not yet noticed by the proxy).
    peer_closed: bool,
    meta: ConnMeta,
    /// The session's name for it while it is in use (from the `Connect` it answers).
    io: IoId,
}

impl UpConn {
    /// What the runtime's peek at this socket would find.
    fn liveness(&self) -> Liveness {
        if !self.unread.is_empty() {
            Liveness::Unread
        } else if self.peer_closed || !self.alive {
            Liveness::Closed
        } else {
            Liveness::Quiet
        }
    }
}

pub struct SimClient {
    pub session: Session,
    /// Bytes the client received from the proxy.
    pub received: Vec<u8>,
    pub closed: bool,
    up: Option<usize>,
    /// The I/O of the session's latest `Connect`.
    up_io: IoId,
}

#[derive(Debug)]
enum Ev {
    /// Bytes from a backend connection towards its client's session.
    UpData {
        conn: usize,
        data: Vec<u8>,
    },
    UpEof {
        conn: usize,
    },
    ConnectDone {
        client: usize,
        conn: usize,
    },
    ConnectFailed {
        client: usize,
        io: IoId,
    },
}

pub struct Sim {
    pub now: Instant,
    pub ctx: Arc<ProxyContext>,
    pub clients: Vec<SimClient>,
    pub backends: Vec<SimBackend>,
    conns: Vec<UpConn>,
    pool: Vec<Pool<usize>>,
    events: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    ev_store: BTreeMap<usize, Ev>,
    seq: u64,
    rng: u64,
    /// Largest piece the network delivers at once (bytes are split at seeded points).
    pub max_piece: usize,
    /// Latency of every hop.
    pub latency: Duration,
    /// The runtime watches idle pooled sockets and closes one as soon as it turns readable
    /// (mio). Off: nothing looks at them until a request takes one (monoio, tokio between
    /// sweeps), so only the check at take time keeps their bytes from a request.
    pub watch_idle: bool,
    /// Sessions woken by another's fetch (their client index), delivered at the next step.
    woken: Arc<SimWake>,
    /// Wake-ups delivered so far.
    pub wakeups: u64,
    /// Deadlines that fired so far (a session that polls shows here).
    pub timeouts: u64,
}

/// The simulator's [`Wake`](crate::wake::Wake) target: tokens are client indices.
#[derive(Default)]
struct SimWake(parking_lot::Mutex<Vec<u64>>);

impl crate::wake::Wake for SimWake {
    fn wake(&self, token: u64) {
        self.0.lock().push(token);
    }
}

impl Sim {
    /// `backends` must list, for every backend of every upstream in `ctx`, its behavior
    /// keyed by address.
    pub fn new(
        ctx: Arc<ProxyContext>,
        backends: Vec<(SocketAddr, Behavior)>,
        seed: u64,
        now: Instant,
    ) -> Sim {
        let pool = Pool::for_each_upstream(&ctx);
        Sim {
            now,
            ctx,
            clients: Vec::new(),
            backends: backends
                .into_iter()
                .map(|(addr, behavior)| SimBackend {
                    addr,
                    behavior,
                    requests: Vec::new(),
                    connections: 0,
                })
                .collect(),
            conns: Vec::new(),
            pool,
            events: BinaryHeap::new(),
            ev_store: BTreeMap::new(),
            seq: 0,
            rng: seed | 1,
            max_piece: usize::MAX,
            latency: Duration::from_micros(100),
            watch_idle: true,
            woken: Arc::default(),
            wakeups: 0,
            timeouts: 0,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        let id = self.seq as usize;
        self.ev_store.insert(id, ev);
        self.events.push(Reverse((at, self.seq, id)));
    }

    /// Open a client connection; returns its index.
    pub fn connect_client(&mut self, addr: SocketAddr) -> usize {
        self.connect_on(self.ctx.clone(), addr)
    }

    /// Open a client connection on another listener (its context, e.g. an admin
    /// listener's: [`crate::admin::context`]); returns its index.
    pub fn connect_on(&mut self, ctx: Arc<ProxyContext>, addr: SocketAddr) -> usize {
        let mut session = Session::new(ctx, addr, self.now);
        let target: Arc<dyn crate::wake::Wake> = self.woken.clone();
        session.set_waker(crate::wake::Waker::new(target, self.clients.len() as u64));
        self.clients.push(SimClient {
            session,
            received: Vec::new(),
            closed: false,
            up: None,
            up_io: IoId::default(),
        });
        self.clients.len() - 1
    }

    /// The client sends bytes; they arrive in seeded random pieces.
    pub fn send(&mut self, c: usize, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let n = if self.max_piece == usize::MAX {
                rest.len()
            } else {
                1 + (self.rand() as usize) % self.max_piece.min(rest.len())
            };
            let now = self.now;
            let cl = &mut self.clients[c];
            if cl.closed {
                return;
            }
            cl.session.feed_client(&rest[..n], now);
            rest = &rest[n..];
            self.step();
        }
    }

    pub fn client_eof(&mut self, c: usize) {
        let now = self.now;
        self.clients[c].session.on_client_eof(now);
        self.step();
    }

    fn backend_index(&self, addr: SocketAddr) -> usize {
        self.backends
            .iter()
            .position(|b| b.addr == addr)
            .expect("sim: backend not configured")
    }

    /// Process actions and output of every session until nothing moves at this instant.
    fn step(&mut self) {
        loop {
            let mut progress = false;
            let woken = std::mem::take(&mut *self.woken.0.lock());
            for c in woken {
                let cl = &mut self.clients[c as usize];
                if !cl.closed {
                    self.wakeups += 1;
                    cl.session.on_wake(self.now);
                    progress = true;
                }
            }
            for c in 0..self.clients.len() {
                progress |= self.step_client(c);
            }
            if !progress {
                break;
            }
        }
    }

    fn step_client(&mut self, c: usize) -> bool {
        let now = self.now;
        let mut progress = false;
        if self.clients[c].closed {
            return false;
        }
        while let Some(a) = self.clients[c].session.poll_action() {
            progress = true;
            match a {
                Action::Connect {
                    io,
                    upstream,
                    backend,
                    addr,
                    fresh,
                } => {
                    if let Some(old) = self.clients[c].up.take() {
                        self.conns[old].alive = false;
                    }
                    self.clients[c].up_io = io;
                    let pooled = if fresh {
                        None
                    } else {
                        let conns = &self.conns;
                        let mut closed = Vec::new();
                        let got = self.pool[upstream as usize].take(
                            backend as usize,
                            now,
                            |&id| conns[id].liveness(),
                            |id| closed.push(id),
                        );
                        for id in closed {
                            self.conns[id].alive = false;
                        }
                        got
                    };
                    if let Some((id, meta)) = pooled {
                        let conn = &mut self.conns[id];
                        conn.client = Some(c);
                        conn.meta = meta;
                        conn.io = io;
                        let unread = std::mem::take(&mut conn.unread);
                        self.clients[c].up = Some(id);
                        let s = &mut self.clients[c].session;
                        s.on_upstream_connected(io, true, now);
                        if !unread.is_empty() {
                            // What the runtime's first read would return.
                            s.feed_upstream(io, &unread, now);
                        }
                        continue;
                    }
                    let b = self.backend_index(addr);
                    match self.backends[b].behavior {
                        Behavior::Refuse => {
                            self.schedule(now + self.latency, Ev::ConnectFailed { client: c, io })
                        }
                        Behavior::Blackhole => {}
                        Behavior::Serve(_) => {
                            let id = self.conns.len();
                            let n = self.backends[b].connections;
                            self.backends[b].connections += 1;
                            self.conns.push(UpConn {
                                backend: b,
                                inbuf: Vec::new(),
                                alive: true,
                                client: Some(c),
                                id: n,
                                head_request: false,
                                unread: Vec::new(),
                                peer_closed: false,
                                meta: ConnMeta {
                                    created: now,
                                    requests: 0,
                                },
                                io,
                            });
                            self.schedule(
                                now + self.latency,
                                Ev::ConnectDone {
                                    client: c,
                                    conn: id,
                                },
                            );
                        }
                    }
                }
                Action::ReleaseUpstream {
                    io: _,
                    upstream,
                    backend,
                    reuse,
                } => {
                    if let Some(id) = self.clients[c].up.take() {
                        let conn = &mut self.conns[id];
                        conn.client = None;
                        let (alive, meta) = (conn.alive, conn.meta);
                        // Core's rule, as the runtimes apply it (the pool counts the
                        // request; the pooled copy of the metadata is the one kept).
                        let back = self.pool[upstream as usize].release(
                            backend as usize,
                            id,
                            meta,
                            reuse && alive,
                            now,
                        );
                        if back.is_some() {
                            self.conns[id].alive = false;
                        }
                    }
                }
            }
        }
        let cl = &mut self.clients[c];
        if cl.session.has_client_output() {
            let (own, shared) = cl.session.client_output().pending_parts();
            cl.received.extend_from_slice(own);
            cl.received.extend_from_slice(shared);
            let n = own.len() + shared.len();
            cl.session.on_client_written(n, now);
            progress = true;
        }
        if let Some(id) = cl.up {
            let connected = self.conns[id].client == Some(c) && cl.session.has_upstream_output();
            if connected && self.conns[id].alive {
                let n = cl.session.upstream_output().len();
                let data = cl.session.upstream_output().pending().to_vec();
                cl.session.on_upstream_written(self.conns[id].io, n, now);
                self.conns[id].inbuf.extend_from_slice(&data);
                self.serve(id);
                progress = true;
            }
        }
        let cl = &mut self.clients[c];
        if cl.session.wants_close() {
            cl.closed = true;
            if let Some(id) = cl.up.take() {
                self.conns[id].alive = false;
            }
            progress = true;
        }
        progress
    }

    /// Let the backend parse and answer complete requests in its input.
    fn serve(&mut self, id: usize) {
        loop {
            let conn = &mut self.conns[id];
            let limits = Limits {
                max_head: 1 << 20,
                max_uri: 1 << 16,
                max_headers: 256,
                max_body: u64::MAX,
            };
            let head = match parse_request(&conn.inbuf, &limits) {
                Ok(Parsed::Complete(h)) => h,
                _ => return,
            };
            let mut pos = head.len;
            let body = match head.body {
                BodyKind::Length(n) => {
                    if conn.inbuf.len() < pos + n as usize {
                        return;
                    }
                    pos += n as usize;
                    conn.inbuf[head.len..pos].to_vec()
                }
                BodyKind::Chunked => {
                    let mut d = ChunkedDecoder::new();
                    let mut body = Vec::new();
                    loop {
                        let Ok((used, ch)) = d.decode(&conn.inbuf[pos..]) else {
                            return;
                        };
                        match ch {
                            Some(Chunk::Data(r)) => {
                                body.extend_from_slice(&conn.inbuf[pos + r.start..pos + r.end])
                            }
                            Some(Chunk::End) => {
                                pos += used;
                                break;
                            }
                            None => {}
                        }
                        pos += used;
                        if used == 0 {
                            return;
                        }
                    }
                    body
                }
                _ => Vec::new(),
            };
            let req = SimRequest {
                head: String::from_utf8_lossy(&conn.inbuf[..head.len]).into_owned(),
                body,
                conn: conn.id,
            };
            conn.head_request = head.method == crate::http1::Method::Head;
            let head_only = conn.head_request;
            conn.inbuf.drain(..pos);
            let b = conn.backend;
            let reply = match &mut self.backends[b].behavior {
                Behavior::Serve(f) => f(&req),
                _ => return,
            };
            self.backends[b].requests.push(req);
            let mut bytes = reply.encode(head_only);
            let at = self.now + self.latency + reply.delay;
            let mut die = reply.close || reply.until_close;
            if let Some(n) = reply.die_after {
                bytes.truncate(n);
                die = true;
            }
            // Deliver in seeded pieces, `drip` apart.
            let mut rest = &bytes[..];
            let mut at = at;
            while !rest.is_empty() {
                let n = if self.max_piece == usize::MAX {
                    rest.len()
                } else {
                    1 + (self.rand() as usize) % self.max_piece.min(rest.len())
                };
                self.schedule(
                    at,
                    Ev::UpData {
                        conn: id,
                        data: rest[..n].to_vec(),
                    },
                );
                rest = &rest[n..];
                at += reply.drip;
            }
            if let Some((after, data)) = reply.then {
                self.schedule(at + after, Ev::UpData { conn: id, data });
            }
            if die {
                self.schedule(at, Ev::UpEof { conn: id });
                return;
            }
        }
    }

    /// Kill every connection of a backend (as if its process died) and refuse new ones.
    pub fn kill_backend(&mut self, addr: SocketAddr) {
        let b = self.backend_index(addr);
        self.backends[b].behavior = Behavior::Refuse;
        let ids: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].backend == b && self.conns[i].alive)
            .collect();
        for id in ids {
            self.schedule(self.now, Ev::UpEof { conn: id });
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::ConnectDone { client, conn } => {
                let cl = &mut self.clients[client];
                if cl.closed || self.conns[conn].client != Some(client) || !self.conns[conn].alive {
                    return;
                }
                let io = self.conns[conn].io;
                if io != cl.up_io {
                    // The session gave this connect up (timed out, released) and asked
                    // again: a runtime closes the socket it was opening.
                    self.conns[conn].alive = false;
                    self.conns[conn].client = None;
                    return;
                }
                cl.up = Some(conn);
                cl.session.on_upstream_connected(io, false, now);
            }
            Ev::ConnectFailed { client, io } => {
                let cl = &mut self.clients[client];
                // A connect given up meanwhile is no longer reported (as a runtime drops it).
                if !cl.closed && io == cl.up_io {
                    cl.session.on_upstream_connect_failed(io, now);
                }
            }
            Ev::UpData { conn, data } => {
                if !self.conns[conn].alive {
                    return;
                }
                match self.conns[conn].client {
                    Some(c) => {
                        let io = self.conns[conn].io;
                        let s = &mut self.clients[c].session;
                        s.feed_upstream(io, &data, now);
                    }
                    None => {
                        // Idle in the pool: the bytes wait in the socket.
                        self.conns[conn].unread.extend_from_slice(&data);
                        self.idle_readable(conn);
                    }
                }
            }
            Ev::UpEof { conn } => {
                if !self.conns[conn].alive || self.conns[conn].peer_closed {
                    return;
                }
                match self.conns[conn].client {
                    Some(c) if !self.clients[c].closed => {
                        self.conns[conn].alive = false;
                        let io = self.conns[conn].io;
                        self.clients[c].session.on_upstream_eof(io, false, now)
                    }
                    Some(_) => self.conns[conn].alive = false,
                    None => {
                        self.conns[conn].peer_closed = true;
                        self.idle_readable(conn);
                    }
                }
            }
        }
    }

    /// An idle pooled connection turned readable: a runtime that watches idle sockets
    /// (`watch_idle`) hands it to the pool's check, which closes it.
    fn idle_readable(&mut self, conn: usize) {
        if !self.watch_idle {
            return;
        }
        let now = self.now;
        let conns = &self.conns;
        let b = conns[conn].backend;
        let Some((up, backend)) = self.ctx.upstreams.iter().find_map(|u| {
            let i = u
                .backends
                .iter()
                .position(|x| x.addr == self.backends[b].addr)?;
            Some((u.id as usize, i))
        }) else {
            return;
        };
        let gone =
            self.pool[up].on_idle_readable(backend, now, |&x| x == conn, |&x| conns[x].liveness());
        if let Some(id) = gone {
            self.conns[id].alive = false;
        }
    }

    /// Run until no event or deadline remains before `now + limit`.
    pub fn run_for(&mut self, limit: Duration) {
        let end = self.now + limit;
        self.step();
        loop {
            let next_ev = self.events.peek().map(|Reverse((t, _, _))| *t);
            let next_deadline = self
                .clients
                .iter()
                .filter(|c| !c.closed)
                .filter_map(|c| c.session.deadline())
                .min();
            let next = match (next_ev, next_deadline) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => {
                        self.now = end;
                        return;
                    }
                },
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            if next_ev.is_some_and(|t| t <= self.now) {
                let Some(Reverse((_, _, id))) = self.events.pop() else {
                    break;
                };
                if let Some(ev) = self.ev_store.remove(&id) {
                    self.deliver(ev);
                }
            } else {
                let now = self.now;
                for c in &mut self.clients {
                    if !c.closed && c.session.deadline().is_some_and(|d| d <= now) {
                        self.timeouts += 1;
                        c.session.on_timeout(now);
                    }
                }
            }
            self.step();
        }
    }

    /// Idle pooled upstream connections.
    pub fn pooled(&self) -> usize {
        self.pool.iter().map(|p| p.idle_count()).sum()
    }
}

/// (status, headers, decoded body) of a response as a client saw it.
pub type ClientResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// Parse a stream of HTTP/1.1 responses as a client would (for assertions): returns
/// (status, headers, decoded body) for each complete response, given whether each request
/// was HEAD.
pub fn parse_responses(mut buf: &[u8], head_flags: &[bool]) -> Vec<ClientResponse> {
    let mut out = Vec::new();
    for &is_head in head_flags {
        let h = match crate::http1::head::parse_response(buf, 1 << 20) {
            Ok(Parsed::Complete(h)) => h,
            _ => break,
        };
        let headers: Vec<(String, String)> = h
            .headers
            .iter()
            .map(|x| {
                (
                    String::from_utf8_lossy(x.name.get(buf)).into_owned(),
                    String::from_utf8_lossy(x.value.get(buf)).into_owned(),
                )
            })
            .collect();
        let mut pos = h.len;
        let mut body = Vec::new();
        let no_body =
            is_head || h.status == 204 || h.status == 304 || (100..200).contains(&h.status);
        if (100..200).contains(&h.status) {
            // Interim: report it and parse the final response for the same request next.
            out.push((h.status, headers, body));
            buf = &buf[pos..];
            let mut rest = parse_responses(buf, &[is_head]);
            if let Some(r) = rest.pop() {
                out.push(r);
            }
            return out;
        }
        if !no_body {
            match h.body {
                BodyKind::Length(n) => {
                    if buf.len() < pos + n as usize {
                        break;
                    }
                    body.extend_from_slice(&buf[pos..pos + n as usize]);
                    pos += n as usize;
                }
                BodyKind::Chunked => {
                    let mut d = ChunkedDecoder::new();
                    let mut complete = false;
                    while let Ok((used, ch)) = d.decode(&buf[pos..]) {
                        match ch {
                            Some(Chunk::Data(r)) => {
                                body.extend_from_slice(&buf[pos + r.start..pos + r.end])
                            }
                            Some(Chunk::End) => {
                                pos += used;
                                complete = true;
                                break;
                            }
                            None => {}
                        }
                        pos += used;
                        if used == 0 {
                            break;
                        }
                    }
                    if !complete {
                        break;
                    }
                }
                BodyKind::UntilClose => {
                    body.extend_from_slice(&buf[pos..]);
                    pos = buf.len();
                }
                BodyKind::None => {}
            }
        }
        out.push((h.status, headers, body));
        buf = &buf[pos..];
    }
    out
}
